"""Pushing a finished local folder (pretraining checkpoint, exported encoder, finetuned model) to the Hugging Face Hub.

The folder is always complete on disk before any network call, so a failed push loses nothing: rerun the push (or
`huggingface-cli upload`) later. Token: `--hub_token`, else `HF_TOKEN` / the `huggingface-cli login` cache.

    from automae_hf.training.hub import push_folder
    push_folder("out/encoder", "org/automae-encoder", private=True, revision="v1", dry_run=True)
"""

from __future__ import annotations

import fnmatch
import json
import logging
from pathlib import Path

logger = logging.getLogger("automae.hub")

# Training state that is never part of a model repository: accelerate / Trainer checkpoints, debug dumps, temp saves.
DEFAULT_IGNORE_PATTERNS = (
    "checkpoints/*",
    "checkpoint-*/*",
    ".tmp-*",
    ".tmp-*/*",
    "weights_rank*.pt",
    "logs/*",
    "runs/*",
    "*.lock",
)


class HubPushError(RuntimeError):
    """A push that could not happen (no token, no network, refused). The message is one line and names the folder."""


def add_hub_arguments(parser) -> None:
    """The `--push_to_hub` options every training/export command shares."""
    group = parser.add_argument_group("hub")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the output folder to the Hub when done.")
    group.add_argument("--hub_model_id", default=None, help="Repository id, e.g. `org/automae-vit-tiny`.")
    group.add_argument("--private", action="store_true", help="Create the repository as private.")
    group.add_argument("--revision", default=None, help="Branch to push to (created when missing); default main.")
    group.add_argument("--hub_token", "--token", dest="hub_token", default=None,
                       help="Token; default HF_TOKEN or the `huggingface-cli login` cache.")
    group.add_argument("--dry_run", action="store_true", help="With --push_to_hub: list what would be uploaded, upload nothing.")


def check_hub_arguments(args, parser) -> None:
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. org/name)")
    if args.dry_run and not args.push_to_hub:
        parser.error("--dry_run only applies with --push_to_hub")


def _ignored(relative: str, patterns) -> bool:
    return any(fnmatch.fnmatch(relative, pattern) for pattern in patterns)  # fnmatch's * also matches "/"


def files_to_upload(folder, ignore_patterns=DEFAULT_IGNORE_PATTERNS) -> list[tuple[str, int]]:
    """(path relative to `folder`, size in bytes) of every file a push uploads, sorted."""
    folder = Path(folder)
    out = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            relative = path.relative_to(folder).as_posix()
            if not _ignored(relative, ignore_patterns) and "/__pycache__/" not in f"/{relative}":
                out.append((relative, path.stat().st_size))
    return out


def format_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def describe_files(files) -> str:
    width = max((len(name) for name, _ in files), default=0)
    lines = [f"  {name:<{width}}  {format_size(size):>9}" for name, size in files]
    lines.append(f"  {len(files)} files, {format_size(sum(s for _, s in files))} in total")
    return "\n".join(lines)


def push_folder(
    folder,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    ignore_patterns=DEFAULT_IGNORE_PATTERNS,
    api=None,
) -> dict:
    """Creates `repo_id` (if needed) and uploads `folder` with `HfApi.create_repo` + `upload_folder`.

    Returns {"repo_id", "revision", "files": [(name, size)], "url" (None on a dry run)}. Raises `HubPushError`
    (one line, the local folder named and untouched) when it cannot push.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise HubPushError(f"{folder} is not a model folder (no config.json); nothing pushed")
    files = files_to_upload(folder, ignore_patterns)
    report = {"repo_id": repo_id, "revision": revision or "main", "files": files, "url": None}
    if dry_run:
        print(f"Dry run: would upload to {repo_id}@{report['revision']} ({'private' if private else 'public'}):")
        print(describe_files(files))
        return report

    import huggingface_hub
    from huggingface_hub import HfApi

    token = token or huggingface_hub.get_token()
    if not token:
        raise HubPushError(
            f"no Hugging Face token (set HF_TOKEN or run `huggingface-cli login`); the local folder {folder} is "
            "complete, push it later"
        )
    api = api or HfApi(token=token)
    retry = f"retry with: huggingface-cli upload {repo_id} {folder} ."
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message=commit_message or f"Upload {folder.name}",
            ignore_patterns=list(ignore_patterns),
        )
    except Exception as error:  # noqa: BLE001  (offline, DNS, 401/403, ...: one clear line, nothing lost)
        reason = " ".join(str(error).split()) or type(error).__name__
        raise HubPushError(
            f"could not push {folder} to {repo_id}: {reason[:300]}; the local folder is complete ({retry})"
        ) from error
    report["url"] = str(getattr(commit, "commit_url", None) or commit)
    print(f"Pushed {len(files)} files to {repo_id}@{report['revision']}: {report['url']}")
    return report


def main(argv=None):
    """`python training/hub.py FOLDER --hub_model_id org/name [--private --revision R --dry_run]`: push any folder
    (e.g. a pretraining run's output) as it is."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Push a model folder (pretraining, encoder, finetuned) to the Hub.")
    parser.add_argument("folder")
    parser.add_argument("--dataset_name", default=None, help="For the model card written when the folder has none.")
    add_hub_arguments(parser)
    args = parser.parse_args(argv)
    args.push_to_hub = True
    check_hub_arguments(args, parser)
    folder = Path(args.folder)
    if (folder / "config.json").is_file() and not (folder / "README.md").exists():
        from .model_card import write_card

        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
        kind = ("pretraining" if "AutoMAEForPreTraining" in architectures
                else "finetuned" if any("ImageClassification" in a for a in architectures) else "encoder")
        print(f"Writing a {kind} model card: {write_card(kind, folder, repo_id=args.hub_model_id, dataset_name=args.dataset_name)}")
    try:
        push_folder(args.folder, args.hub_model_id, args.private, args.revision, args.hub_token, dry_run=args.dry_run)
    except HubPushError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
