from model.config import Config
from model.gpt import GPT
from model.tokenizer import Tokenizer

__all__ = ["Config", "GPT", "Tokenizer"]
