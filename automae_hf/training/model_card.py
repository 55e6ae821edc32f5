"""Model cards (README.md) for pretraining checkpoints, exported encoders and finetuned models.

Templates live in `automae_hf/model_cards/` (package data, so a wheel install has them; jinja, rendered by
`huggingface_hub.ModelCard.from_template`); this module fills them from what a run left in its folder
(`config.json`, `train_summary.json`, `train_log.jsonl`, `all_results.json`) plus what the caller knows (data set,
base model, results). Local folders are never named by their path. The YAML header is built with `ModelCardData` /
`EvalResult`, so it is what the Hub expects (`library_name`, `pipeline_tag`, `tags`, `datasets`, `license`,
`base_model`, `model-index`).

    python training/model_card.py FOLDER --kind pretraining [--dataset_name cifar10 --repo_id org/name]
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
from pathlib import Path

TEMPLATES = importlib.resources.files("automae_hf") / "model_cards"  # package data: found in a wheel install too
KINDS = ("pretraining", "encoder", "finetuned")
PIPELINE_TAGS = {"pretraining": None, "encoder": "image-feature-extraction", "finetuned": "image-classification"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def hub_id(value) -> str | None:
    """`value` if it names a Hub repository (not a local folder), else None: only Hub ids are valid card metadata."""
    if not value or not isinstance(value, str) or os.path.exists(value) or not _HUB_ID.match(value):
        return None
    return value


LOCAL_DATA_SET = "a local data set"


def public_name(value) -> str | None:
    """A name fit for public metadata: a Hub id as it is, a local folder as "local folder <its last component>"
    (never a path); None for nothing."""
    if not value:
        return None
    return hub_id(value) or f"local folder {Path(str(value)).name}"


def dataset_label(value, run_recorded: bool = False) -> str | None:
    """The data set a card names: a Hub id, else LOCAL_DATA_SET for a local one (a folder, `--train_dir`). A
    pretraining summary records Hub ids only, so `run_recorded` with no value also means a local data set; None:
    unknown."""
    if value:
        return hub_id(value) or LOCAL_DATA_SET
    return LOCAL_DATA_SET if run_recorded else None


def read_run_metadata(folder) -> dict:
    """What a run folder says about itself: config, train summary, last logged step, results (any may be absent)."""
    folder = Path(folder)

    def load_json(name):
        try:
            return json.loads((folder / name).read_text())
        except (OSError, ValueError):
            return None

    last_log = None
    try:
        lines = [line for line in (folder / "train_log.jsonl").read_text().splitlines() if line.strip()]
        last_log = json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        pass
    return {
        "config": load_json("config.json") or {},
        "summary": load_json("train_summary.json") or {},
        "last_log": last_log,
        "results": load_json("all_results.json"),
        "card_metadata": load_json("card_metadata.json") or {},
    }


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def pretraining_settings(metadata: dict, dataset: str | None = None) -> list[tuple[str, str]]:
    """Rows of the settings table: data set, steps, geometry, mask settings, teacher."""
    config, summary = metadata.get("config", {}), metadata.get("summary", {})
    dataset = dataset_label(dataset or summary.get("dataset_name") or metadata.get("card_metadata", {}).get("dataset"),
                            run_recorded=bool(summary))
    masking = config.get("masking", "learned")
    teacher = summary.get("teacher")
    if masking == "random":
        teacher_text = "none (random masking, plain MAE)"
    elif masking == "box_prior":
        teacher_text = "none (boxes of the data set raise the masking noise)"
    elif teacher == "self" or config.get("teacher_name_or_path") == "self":
        teacher_text = "self (the student's own attention)"
    else:  # config.json may hold a local path; the summary already holds a public name
        teacher_text = public_name(config.get("teacher_name_or_path")) or summary.get("teacher_name_or_path") or "—"
    rows = [
        ("data set", dataset or "—"),
        ("optimizer steps", summary.get("final_step", (metadata.get("last_log") or {}).get("step"))),
        ("architecture", f"ViT, hidden {config.get('hidden_size')}, {config.get('num_hidden_layers')} layers, "
                         f"{config.get('num_attention_heads')} heads, patch {config.get('patch_size')}"),
        ("image size", config.get("image_size")),
        ("masking", masking),
        ("mask ratio", config.get("mask_ratio")),
        ("mask factor (beta)", config.get("mask_factor") if masking in ("learned", "box_prior") else None),
        ("adversarial weight (lambda)", config.get("adversarial_weight") if masking == "learned" else None),
        ("teacher", teacher_text),
        ("norm-pix loss", config.get("norm_pix_loss")),
    ]
    if masking == "attention":
        rows.insert(rows.index(("teacher", teacher_text)), ("attention hint ratio", config.get("attention_hint_ratio")))
    return [(k, _fmt(v)) for k, v in rows]


def _table(rows) -> str:
    return "\n".join(f"| {k} | {v} |" for k, v in rows)


def _log_summary(metadata: dict) -> str:
    log = metadata.get("last_log")
    if not log:
        return ""
    parts = [f"{k} {_fmt(log[k])}" for k in ("loss", "reconstruction_loss", "generator_loss", "d_loss") if k in log]
    return f"Last logged step ({log.get('step')}): " + ", ".join(parts) + "." if parts else ""


def results_table(results: dict | None) -> str:
    if not results:
        return "No evaluation results recorded."
    rows = [(k, _fmt(v)) for k, v in sorted(results.items()) if isinstance(v, (int, float)) and "accuracy" in k]
    rows += [(k, _fmt(v)) for k, v in sorted(results.items()) if isinstance(v, (int, float)) and "accuracy" not in k
             and k.endswith(("loss", "samples", "epoch"))]
    return "| metric | value |\n|---|---|\n" + _table(rows)


def build_card(
    kind: str,
    folder,
    repo_id: str | None = None,
    dataset_name: str | None = None,
    base_model: str | None = None,
    results: dict | None = None,
    export_format: str = "automae",
    license: str = "apache-2.0",
    extra_settings: list[tuple[str, str]] | None = None,
    pretraining_metadata: dict | None = None,
):
    """A `huggingface_hub.ModelCard` for `folder` (not written). `pretraining_metadata`: `read_run_metadata` of the
    pretraining run an encoder / classifier came from (default: the folder's own)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    folder = Path(folder)
    metadata = read_run_metadata(folder)
    source = pretraining_metadata or metadata
    config = metadata["config"]
    repo_id = repo_id or folder.name
    model_name = repo_id.split("/")[-1]
    dataset_id = hub_id(dataset_name)
    dataset_text = dataset_label(dataset_name, run_recorded=True)  # no machine paths in public metadata
    is_vit = config.get("model_type") == "vit"
    tags = ["automae", "masked-autoencoder", "vision", "vit"]
    tags.append({"pretraining": "pretraining", "encoder": "feature-extraction", "finetuned": "image-classification"}[kind])
    eval_results = None
    results = results if results is not None else metadata.get("results")
    if kind == "finetuned" and results and "eval_accuracy" in results:
        # The test split, when finetuning evaluated one, is the split no checkpoint was chosen on.
        prefix, default_split = ("test", "test") if "test_accuracy" in results else ("eval", "validation")
        eval_results = [EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset_id or "imagefolder",
            dataset_name=dataset_text,
            dataset_split=results.get(f"{prefix}_split", default_split),
            metric_type="accuracy",
            metric_name="Accuracy",
            metric_value=float(results[f"{prefix}_accuracy"]),
        )]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS[kind],
        tags=tags,
        datasets=[dataset_id] if dataset_id else None,
        license=license,
        base_model=hub_id(base_model),
        model_name=model_name,
        eval_results=eval_results,
    )
    remote = not is_vit
    trust = ", trust_remote_code=True" if remote else ""
    if kind == "encoder":
        if is_vit:
            load = ("```python\nfrom transformers import ViTModel, ViTForImageClassification, pipeline\n"
                    f'encoder = ViTModel.from_pretrained("{repo_id}", add_pooling_layer=False)  # no pooler weights\n'
                    f'classifier = ViTForImageClassification.from_pretrained("{repo_id}", num_labels=10)\n'
                    f'extractor = pipeline("image-feature-extraction", model="{repo_id}")\n```')
        else:
            load = ("```python\nfrom transformers import AutoModel, AutoModelForImageClassification, ViTModel\n"
                    f'encoder = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)  # or `import automae_hf`\n'
                    f'classifier = AutoModelForImageClassification.from_pretrained("{repo_id}", trust_remote_code=True, num_labels=10)\n'
                    f'vit = ViTModel.from_pretrained("{repo_id}", add_pooling_layer=False)  # same weights, plain transformers\n```')
    else:
        load = ("The folder also loads into `transformers.ViTForImageClassification` (same key names)."
                if remote and kind == "finetuned" else "")
    pooling = (pretraining_metadata or metadata)["config"].get("pooling") or config.get("pooling") or "cls"
    variables = dict(
        model_name=model_name,
        repo_id=repo_id,
        settings_table=_table(pretraining_settings(source, dataset_name if kind != "finetuned" else None)
                              if kind != "finetuned" else (extra_settings or [])),
        log_summary=_log_summary(source),
        load_instructions=load,
        architecture=(f"hidden {config.get('hidden_size')}, {config.get('num_hidden_layers')} layers, "
                      f"patch {config.get('patch_size')}, {config.get('image_size')} px"),
        format_description=("plain transformers `ViTModel` (model_type vit), no remote code needed; no pooler "
                             "weights (load with add_pooling_layer=False)" if is_vit else
                             "`AutoMAEModel` with its module files and full `auto_map` (trust_remote_code, or "
                             "`import automae_hf`); also loads into `ViTModel`"),
        image_size=config.get("image_size"),
        channel_handling=("one channel: give it grayscale images (`image.convert(\"L\")`); it does not convert "
                          "colour ones" if config.get("num_channels") == 1 else "convert grayscale to RGB"),
        pooling=pooling,
        pooling_description=("the mean of the patch tokens (`last_hidden_state[:, 1:].mean(1)`)" if pooling == "mean"
                             else "the CLS token (`last_hidden_state[:, 0]`)"),
        base_description=(f"`{hub_id(base_model)}`" if hub_id(base_model) else
                          f"an AutoMAE encoder ({public_name(base_model)})" if base_model else "an AutoMAE encoder"),
        dataset_description=f"`{dataset_id}`" if dataset_id else dataset_text,
        results_table=results_table(results),
        trust_remote_code_arg=trust,
    )
    if kind == "finetuned" and extra_settings is None:
        variables["settings_table"] = "| — | — |"
    with importlib.resources.as_file(TEMPLATES / f"{kind}.md") as template_path:
        return ModelCard.from_template(card_data, template_path=str(template_path), **variables)


def write_card(kind: str, folder, **kwargs) -> Path:
    """Builds the card and writes `folder/README.md`."""
    card = build_card(kind, folder, **kwargs)
    path = Path(folder) / "README.md"
    card.save(str(path))
    return path


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Write README.md (model card) for a run folder.")
    parser.add_argument("folder")
    parser.add_argument("--kind", choices=KINDS, default="pretraining")
    parser.add_argument("--repo_id", default=None)
    parser.add_argument("--dataset_name", default=None)
    parser.add_argument("--base_model", default=None)
    parser.add_argument("--license", default="apache-2.0")
    args = parser.parse_args(argv)
    path = write_card(args.kind, args.folder, repo_id=args.repo_id, dataset_name=args.dataset_name,
                      base_model=args.base_model, license=args.license)
    print(path)


if __name__ == "__main__":
    main()
