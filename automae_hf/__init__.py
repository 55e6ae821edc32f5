"""AutoMAE for transformers: `import automae_hf` registers the models with the Auto* factories."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from .configuration_automae import AUTOMAE_PRESETS, AutoMAEConfig, AutoMAEMaskGeneratorConfig
from .modeling_automae import (
    AutoMAEDiscriminator,
    AutoMAEForImageClassification,
    AutoMAEForPreTraining,
    AutoMAEMaskGenerator,
    AutoMAEModel,
    AutoMAEPreTrainedModel,
)

__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register(AutoMAEConfig.model_type, AutoMAEConfig, exist_ok=True)
    AutoConfig.register(AutoMAEMaskGeneratorConfig.model_type, AutoMAEMaskGeneratorConfig, exist_ok=True)
    AutoModel.register(AutoMAEConfig, AutoMAEModel, exist_ok=True)
    AutoModelForPreTraining.register(AutoMAEConfig, AutoMAEForPreTraining, exist_ok=True)
    AutoModelForImageClassification.register(AutoMAEConfig, AutoMAEForImageClassification, exist_ok=True)
    AutoModel.register(AutoMAEMaskGeneratorConfig, AutoMAEMaskGenerator, exist_ok=True)
    # save_pretrained writes `auto_map` and copies the module files, for trust_remote_code loading.
    AutoMAEConfig.register_for_auto_class()
    AutoMAEMaskGeneratorConfig.register_for_auto_class()
    AutoMAEModel.register_for_auto_class("AutoModel")
    AutoMAEForPreTraining.register_for_auto_class("AutoModelForPreTraining")
    AutoMAEForImageClassification.register_for_auto_class("AutoModelForImageClassification")
    AutoMAEMaskGenerator.register_for_auto_class("AutoModel")


_register()

__all__ = [
    "AUTOMAE_PRESETS",
    "AutoMAEConfig",
    "AutoMAEDiscriminator",
    "AutoMAEForImageClassification",
    "AutoMAEForPreTraining",
    "AutoMAEMaskGenerator",
    "AutoMAEMaskGeneratorConfig",
    "AutoMAEModel",
    "AutoMAEPreTrainedModel",
]
