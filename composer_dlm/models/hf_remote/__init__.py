"""Self-contained Hugging Face remote code written into every export (``configuration_llada.py``,
``modeling_llada.py``), so ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` works where composer-dlm
is not installed. The files import only torch and transformers; composer-dlm itself never imports them."""
