from sdft.adapters.dreambooth_lora import DreamBoothLoRAMethod
from sdft.adapters.full import FullFineTuneMethod
from sdft.adapters.locon import LoConMethod
from sdft.adapters.loha import LoHaMethod
from sdft.adapters.lokr import LoKrMethod
from sdft.adapters.lora import LoRAMethod
from sdft.adapters.textual_inversion import TextualInversionMethod

__all__ = [
    "DreamBoothLoRAMethod",
    "FullFineTuneMethod",
    "LoConMethod",
    "LoHaMethod",
    "LoKrMethod",
    "LoRAMethod",
    "TextualInversionMethod",
]
