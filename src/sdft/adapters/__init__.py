from sdft.adapters.lora import LoRAMethod

__all__ = ["LoRAMethod"]
