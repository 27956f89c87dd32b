"""slowft: full-parameter fine-tuning of llama models larger than memory, one block at a time from SSD."""
from .distributed import Ranks
from .errors import Interrupted, NonFiniteError, RankLost, SlowftError
from .generate import chat, generate
from .model import ModelArgs
from .offloaded import OffloadedModel, load
from .optim import SGD, Adalite, AdaLomo, AdamW
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["load", "generate", "chat", "SGD", "Adalite", "AdaLomo", "AdamW", "Tokenizer", "load_tokenizer", "ModelArgs", "OffloadedModel",
           "SlowftError", "NonFiniteError", "Interrupted", "Ranks", "RankLost"]
