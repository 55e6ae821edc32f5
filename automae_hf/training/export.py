#!/usr/bin/env python
"""Export the encoder of an AutoMAE pretraining checkpoint as a model repository folder.

    python training/export_encoder.py --model_name_or_path runs/pretrain --output_dir runs/encoder
    python training/export_encoder.py --model_name_or_path runs/pretrain --output_dir runs/encoder-vit --format vit
    python training/export_encoder.py ... --push_to_hub --hub_model_id org/automae-encoder [--private --revision v1 --dry_run]

`--format automae` (default): `AutoMAEModel` weights (safetensors), `config.json` with the full `auto_map` and the
module files (loads with `trust_remote_code=True` where `automae_hf` is not installed, and into `ViTModel`),
the checkpoint's image processor, a model card. `--format vit`: a plain transformers `ViTModel` checkpoint
(`model_type: vit`, no pooler weights), no remote code at all. Either way the folder holds no decoder, mask
generator, teacher or discriminator weights (checked after writing).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import torch

from ..configuration_automae import ENCODER_ARCHITECTURE_FIELDS
from .data import load_image_processor, one_line
from .hub import HubPushError, add_hub_arguments, check_hub_arguments, push_folder
from .model_card import dataset_label, hub_id, public_name, read_run_metadata, write_card

logger = logging.getLogger("automae.export")

ENCODER_PREFIXES = ("embeddings.", "encoder.", "layernorm.")
FORBIDDEN_KEY_PARTS = ("decoder", "mask_generator", "teacher", "discriminator", "score_head")


class ExportError(RuntimeError):
    """A checkpoint that cannot be exported; the message is one line."""


def check_source(name_or_path: str) -> None:
    """Fails early, in one line, on a missing folder, a folder without config/weights, or a foreign model type."""
    path = Path(name_or_path)
    if not path.exists():
        if hub_id(name_or_path) is None or name_or_path.startswith((".", "/", "~")):
            raise ExportError(f"checkpoint {name_or_path!r} not found (no such folder)")
        return  # a Hub id: from_pretrained fetches it
    if not path.is_dir():
        raise ExportError(f"checkpoint {name_or_path!r} is a file; give the pretraining output folder")
    if not (path / "config.json").is_file():
        raise ExportError(f"checkpoint {name_or_path!r} has no config.json (not a save_pretrained folder)")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except ValueError as error:
        raise ExportError(f"checkpoint {name_or_path!r}: corrupt config.json ({one_line(error)[:400]})") from None
    if model_type not in ("automae", "vit_mae"):
        raise ExportError(f"checkpoint {name_or_path!r} has model_type {model_type!r}; expected an AutoMAE "
                          "(or ViTMAE) pretraining checkpoint")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ExportError(f"checkpoint {name_or_path!r} has no weights (model.safetensors missing)")


def load_encoder(name_or_path: str, cache_dir=None):
    """`AutoMAEModel` from a pretraining checkpoint (decoder, generator, teacher and D are left out on purpose)."""
    import automae_hf  # noqa: F401
    from automae_hf import AutoMAEModel

    check_source(name_or_path)
    try:
        model, info = AutoMAEModel.from_pretrained(name_or_path, cache_dir=cache_dir, output_loading_info=True)
    except Exception as error:  # noqa: BLE001  (truncated / corrupt safetensors, bad config, network)
        raise ExportError(f"checkpoint {name_or_path!r} is corrupt or unreadable: {one_line(error)[:400]}") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_embeddings")]
    if missing or info.get("mismatched_keys"):
        raise ExportError(f"checkpoint {name_or_path!r} lacks encoder weights: missing {sorted(missing)[:5]}, "
                          f"mismatched {list(info.get('mismatched_keys') or [])[:3]}")
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ExportError(f"checkpoint {name_or_path!r}: encoder weight {name} holds NaN/inf")
    return model.eval()


def vit_config_from(config):
    """The `ViTConfig` of an AutoMAE encoder: the architecture fields both configs share, with the same meaning."""
    from transformers import ViTConfig

    fields = {name: getattr(config, name) for name in ENCODER_ARCHITECTURE_FIELDS}
    vit_config = ViTConfig(**fields)
    vit_config.architectures = ["ViTModel"]
    return vit_config


def safetensors_keys(folder) -> list[str]:
    from safetensors import safe_open

    keys = []
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            keys.extend(handle.keys())
    return keys


def assert_encoder_only(folder) -> list[str]:
    """Every weight in `folder` is an encoder weight: no decoder / generator / teacher / discriminator keys."""
    keys = safetensors_keys(folder)
    if not keys:
        raise ExportError(f"{folder}: no safetensors weights were written")
    foreign = [k for k in keys if any(part in k for part in FORBIDDEN_KEY_PARTS) or not k.startswith(ENCODER_PREFIXES)]
    if foreign:
        raise ExportError(f"{folder}: non-encoder weights in the export: {foreign[:5]}")
    return keys


def export_encoder(
    model_name_or_path: str,
    output_dir,
    export_format: str = "automae",
    dataset_name: str | None = None,
    hub_model_id: str | None = None,
    license: str = "apache-2.0",
    cache_dir=None,
) -> Path:
    """Writes the encoder folder (weights, config, image processor, model card) and returns it."""
    if export_format not in ("automae", "vit"):
        raise ExportError(f"--format must be 'automae' or 'vit', got {export_format!r}")
    output_dir = Path(output_dir)
    encoder = load_encoder(model_name_or_path, cache_dir)
    processor = load_image_processor(model_name_or_path, encoder.config, cache_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(output_dir.glob("*.safetensors")) + list(output_dir.glob("*.py")):
        stale.unlink()  # a previous export in another format must not leave weights or remote code behind

    if export_format == "automae":
        encoder.config.architectures = ["AutoMAEModel"]
        encoder.save_pretrained(str(output_dir), safe_serialization=True)
    else:
        from transformers import ViTModel

        # Through a temporary AutoMAE save: ViTModel reads the legacy key names that save_pretrained writes.
        staging = output_dir / ".staging-automae"
        shutil.rmtree(staging, ignore_errors=True)
        encoder.save_pretrained(str(staging), safe_serialization=True)
        vit, info = ViTModel.from_pretrained(str(staging), config=vit_config_from(encoder.config),
                                             add_pooling_layer=False, output_loading_info=True)
        if info["missing_keys"] or info["mismatched_keys"]:
            raise ExportError(f"ViTModel did not take every encoder weight: missing {info['missing_keys'][:5]}")
        x = torch.randn(1, encoder.config.num_channels, *_pair(encoder.config.image_size),
                        generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            difference = (vit.eval()(x).last_hidden_state - encoder(x).last_hidden_state).abs().max().item()
        if difference > 1e-4:
            raise ExportError(f"the ViTModel export differs from the AutoMAE encoder by {difference:.3g}")
        shutil.rmtree(staging)
        vit.save_pretrained(str(output_dir), safe_serialization=True)
    processor.save_pretrained(str(output_dir))
    source = Path(model_name_or_path)
    pretraining_metadata = read_run_metadata(source) if source.is_dir() else None
    if pretraining_metadata and pretraining_metadata["summary"]:  # without the run's local output path
        summary = {k: v for k, v in pretraining_metadata["summary"].items() if k != "output_dir"}
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    if pretraining_metadata is not None and dataset_name:
        pretraining_metadata["summary"].setdefault("dataset_name", dataset_name)
    card_metadata = {"dataset": dataset_label(dataset_name), "base_model": public_name(model_name_or_path),
                     "format": export_format,
                     "pooling": encoder.config.pooling}
    (output_dir / "card_metadata.json").write_text(json.dumps(card_metadata, indent=2))
    write_card("encoder", output_dir, repo_id=hub_model_id, dataset_name=dataset_name,
               base_model=model_name_or_path, export_format=export_format, license=license,
               pretraining_metadata=pretraining_metadata)
    assert_encoder_only(output_dir)
    return output_dir


def _pair(value):
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export the encoder of an AutoMAE pretraining checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name_or_path", required=True, help="Pretraining output folder (or Hub id).")
    p.add_argument("--output_dir", required=True, help="Where the encoder folder is written.")
    p.add_argument("--format", dest="export_format", choices=("automae", "vit"), default="automae",
                   help="automae: AutoMAEModel + remote code; vit: plain transformers ViTModel.")
    p.add_argument("--dataset_name", default=None, help="Pretraining data set, for the model card.")
    p.add_argument("--license", default="apache-2.0", help="License in the model card metadata.")
    p.add_argument("--cache_dir", default=None)
    add_hub_arguments(p)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_hub_arguments(args, parser)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        folder = export_encoder(args.model_name_or_path, args.output_dir, args.export_format, args.dataset_name,
                                args.hub_model_id, args.license, args.cache_dir)
    except ExportError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    from .hub import describe_files, files_to_upload

    print(f"Exported the encoder ({args.export_format} format) to {folder}:")
    print(describe_files(files_to_upload(folder)))
    if args.push_to_hub:
        try:
            push_folder(folder, args.hub_model_id, args.private, args.revision, args.hub_token, dry_run=args.dry_run)
        except HubPushError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
