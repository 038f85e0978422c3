"""Retraining: a challenger built from the champion's own config, with newly labelled samples merged into its data.

``edgekit retrain --from OUT_DIR|CONFIG --add-data LABELLED`` reads the
champion's config (``<out>/build-config.yaml``, which every build records with
:func:`edgekit.config.save_build_config`, or a build config YAML), merges the labelled rows
into the champion's data, and hands the ordinary build a challenger config: the
same targets, budgets and recipe, the same model name, a higher version.

The merge rule (``edgekit retrain --help`` says the same):

- The champion's rows keep exactly the split they had in its build (its split
  column, or the build's seeded hash split), so its test split stays
  comparable. Only the rows its build kept are carried over.
- New rows keep their own split column when they have one; otherwise they are
  split by the rule the build uses for data without one
  (``edgekit.data.assign_splits``: stratified 70/10/20 per label by a content
  hash), over the new rows alone, so adding them moves no champion row.
- A new text the champion already has with the same label is a duplicate and is
  dropped. With another label a person relabelled it: the new label wins and
  the row stays in the champion's split.
- The new rows are cleaned as the build cleans (``text_data.clean_rows``):
  unlabelled rows (``export-samples`` writes ``label: null`` where the device
  predicted nothing), empty texts, repeats, and texts given two labels are
  dropped and counted.
- A label the champion does not know is an error unless ``--new-classes``: new
  classes change the model's head and outputs.

The merged rows go to one JSONL file with a split column,
``<out>/data/retrain-data.jsonl`` (each row's ``origin``: champion, relabelled
or added), and the challenger's ``data.path`` names it; ``data.calibration_path``
stays the champion's, so quantization calibrates as it did for the champion.

From the champion's weights: when ``--from`` is a build output whose trained
PyTorch model (its finetune pass's output, else its load pass's, as the build's
``report.json`` records them: ``edgekit.build_output``) is still in the pass
cache, that model is copied to ``<out>/champion-model`` and becomes the
challenger's ``model.source``. A classifier saved by a build is a Hugging Face
folder with its head and tokenizer, so the load pass reads it like any source:
it loads the champion's head when the labels are the champion's (same names,
same order) and refits it on the merged data; with ``--new-classes`` the head
is initialised afresh for the new labels (``text_models.new_classifier``: even
one of the same size, whose rows belong to other classes) and fitted, on the
champion's encoder. ``head.pooling`` is pinned to the pooling the champion was
trained with (its ``config.json``'s ``edgekit_pooling``; the saved folder has no
sentence-transformers pooling config for ``auto`` to read). Then LoRA adapts
it: the champion's finetune settings as LoRA, with adapters on the token
embeddings too, so words the drift brought can move (``lora_from``). Otherwise
(a config YAML, a cache entry gone) the challenger is the champion's config as
it was, trained from its ``model.source`` on the merged data.

The challenger's output folder (``--out``) must be new or empty (``--force``
builds into a used one), must not be the champion's own output, and must not
hold the champion's data (``data.path``) or, for a config YAML, be its folder:
a retrain never overwrites what it reads, nor silently replaces another
challenger's bundles of the same version.

Only text classification is merged so far: other tasks get an error saying how
to rebuild with their new data by hand.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.config import BUILD_CONFIG_FILE, PACKAGED_DATA_PREFIX, BuildConfig, DataSection, FinetuneSection
from edgekit.data import SPLITS, DataError, Example, assign_splits
from edgekit.errors import EdgekitError

if TYPE_CHECKING:
    from edgekit.tasks.text_data import CleaningReport, Dataset

MERGED_DATA = Path("data") / "retrain-data.jsonl"
SUMMARY_FILE = Path("data") / "retrain-summary.json"
CHAMPION_MODEL = "champion-model"
EMBEDDINGS_MODULE = "word_embeddings"  # the token embeddings' module in every family LoRA knows (BERT, DistilBERT, RoBERTa)
TEXT_TASK = "text-classification"
# The seed the build splits text data without a split column with (text_data.load_dataset's default, as the text task
# calls it): new rows are split by the same rule.
SPLIT_SEED = 0
MERGE_RULE = (
    "the champion's rows keep the split they had in its build; new rows keep their own split column, else are split "
    "by the build's hash rule (stratified 70/10/20 per label) over the new rows alone; a new text the champion has "
    "with the same label is dropped as a duplicate, with another label the new label wins and the row keeps its split"
)


# ---------------------------------------------------------------------- the recorded build config


# ---------------------------------------------------------------------- the champion


@dataclass(frozen=True)
class Champion:
    """The model being retrained: its config, and the build output it came from (None for a config YAML)."""

    config: BuildConfig
    source: Path  # what --from named
    out_dir: Path | None


def read_champion(source: Path) -> Champion:
    """The champion named by ``--from``: a build output folder (its build-config.yaml) or a build config YAML."""
    from edgekit.config import load_build_config

    if source.is_dir():
        recorded = source / BUILD_CONFIG_FILE
        if recorded.is_file():
            return Champion(load_build_config(recorded), source, source)
        if (source / "passes").is_dir() or any(source.glob("*/report.json")):
            raise EdgekitError(f"--from {source} is a build output without {BUILD_CONFIG_FILE} (built before edgekit "
                               "recorded its config); rebuild it with `edgekit build`, or pass the build config YAML it "
                               "was built from as --from")
        raise EdgekitError(f"--from {source} is not a build output (no {BUILD_CONFIG_FILE}); give the folder "
                           "`edgekit build --out` wrote, or a build config YAML")
    if not source.exists():
        raise EdgekitError(f"--from {source} does not exist; give the champion's build output folder or its build config YAML")
    if source.suffix.lower() not in (".yaml", ".yml"):
        raise EdgekitError(f"--from {source} is neither a build output folder nor a build config YAML (.yaml)")
    return Champion(load_build_config(source), source, None)


def champion_dataset(config: BuildConfig) -> Dataset:
    """The champion's rows as its build read, cleaned and split them."""
    from edgekit.tasks.text_data import load_dataset

    columns = config.data
    try:
        return load_dataset(columns.path, columns.text_column, columns.label_column, columns.split_column)
    except DataError as error:
        raise EdgekitError(f"the champion's data cannot be read: {error}. Retraining merges into the data the champion "
                           "was built from: restore it, or pass --from a build config whose data.path names it") from None


# ---------------------------------------------------------------------- the labelled rows and the merge


def read_labelled(path: Path, columns: DataSection) -> tuple[list[Example], CleaningReport]:
    """The labelled rows of ``path`` (the champion's column names), cleaned as the build cleans; at least one remains."""
    from edgekit.tasks.text_data import clean_rows, read_rows

    what = ("the JSONL `edgekit fleet export-samples` wrote (once each row's label is set), or a CSV/TSV, JSONL or "
            f"Parquet file with columns {columns.text_column!r} and {columns.label_column!r}")
    if not path.exists():
        raise EdgekitError(f"--add-data {path} does not exist; give {what}")
    if path.is_dir() and not any((path / name).is_file() for name in ("dataset_dict.json", "state.json")):
        raise EdgekitError(f"--add-data {path} is a folder (class folders are image data), but the champion classifies "
                           f"text; give {what}")
    try:
        rows = read_rows(path, columns.text_column, columns.label_column, columns.split_column)
        examples, cleaning = clean_rows(rows, str(path))
    except DataError as error:
        raise EdgekitError(f"--add-data: {error}") from None
    except OSError as error:
        raise EdgekitError(f"--add-data {path} cannot be read ({error.strerror or error}); check its permissions") from None
    if not examples:
        raise EdgekitError(f"--add-data {path} has no usable labelled rows ({cleaning.summary()}); set each row's "
                           f"{columns.label_column!r} to its class (export-samples leaves it null where the device "
                           "predicted nothing)")
    return examples, cleaning


@dataclass(frozen=True)
class MergedRow:
    text: str
    label: str
    split: str
    origin: str  # champion | relabelled | added


@dataclass(frozen=True)
class Merge:
    """The merged rows and what the merge did."""

    rows: tuple[MergedRow, ...]
    added: dict[str, dict[str, int]]  # split -> label -> new rows added
    relabelled: int  # champion rows whose label the new data changed
    duplicates: int  # new rows the champion already had with the same label
    unknown_labels: tuple[str, ...]  # labels of the new rows the champion does not know
    warnings: tuple[str, ...] = field(default=())

    @property
    def added_rows(self) -> int:
        return sum(sum(labels.values()) for labels in self.added.values())


def merge_labelled(champion: Dataset, labelled: list[Example]) -> Merge:
    """The champion's rows in their splits (relabelled where the new data says so), then the new rows, split by the
    merge rule (module docstring). ``labelled`` is cleaned: one label per text, all with a split or none."""
    known = {example.text: example.label for name in SPLITS for example in champion.split(name)}
    relabelled: dict[str, str] = {}
    fresh: list[Example] = []
    duplicates = 0
    for example in labelled:
        if example.text not in known:
            fresh.append(example)
        elif known[example.text] == example.label:
            duplicates += 1
        else:
            relabelled[example.text] = example.label
    warnings: list[str] = []
    if fresh and not fresh[0].split:
        fresh, warnings = assign_splits(fresh, SPLIT_SEED)
    rows = [MergedRow(e.text, relabelled.get(e.text, e.label), e.split, "relabelled" if e.text in relabelled else "champion")
            for name in SPLITS for e in champion.split(name)]
    rows += [MergedRow(e.text, e.label, e.split, "added") for e in fresh]
    added = {name: dict(sorted(Counter(e.label for e in fresh if e.split == name).items())) for name in SPLITS}
    unknown = sorted(({e.label for e in fresh} | set(relabelled.values())) - set(champion.labels))
    return Merge(tuple(rows), added, len(relabelled), duplicates, tuple(unknown), tuple(warnings))


def write_merged(merge: Merge, path: Path, columns: DataSection) -> None:
    """The merged rows as JSONL with the champion's column names and a split column, written atomically."""
    from device_agent.files import write_atomically

    lines = [json.dumps({columns.text_column: row.text, columns.label_column: row.label, columns.split_column: row.split,
                         "origin": row.origin}, ensure_ascii=False) for row in merge.rows]
    write_atomically(path, ("\n".join(lines) + "\n").encode("utf-8"))


# ---------------------------------------------------------------------- the challenger


def next_version(champion: str, wanted: str | None) -> str:
    """``wanted``, checked to be above ``champion`` as devices compare versions; by default the last number plus one."""
    from pydantic import ValidationError

    from device_agent.repository import version_key
    from edgekit.config import ModelSection

    if wanted is None:
        *head, last = champion.split(".")
        return ".".join([*head, str(int(last) + 1)])
    try:
        ModelSection(version=wanted)
    except ValidationError:
        raise EdgekitError(f"--version {wanted!r} is not a version: give one to four numbers separated by dots, "
                           "e.g. 1.0.1") from None
    if version_key(wanted) <= version_key(champion):
        raise EdgekitError(f"--version {wanted} is not above the champion's {champion}; devices refuse a version below "
                           "the highest they installed: give a higher one (or leave --version out for "
                           f"{next_version(champion, None)})")
    return wanted


def trained_model(champion: Champion) -> tuple[Path | None, str]:
    """The folder of the champion's trained PyTorch model in the pass cache (its finetune pass's output, else its load
    pass's), or None; and a sentence saying why not, for the terminal.

    The pass is the one the champion's build ran, by the cache key its ``report.json`` records
    (``edgekit.build_output``), so a link left in ``<out>/passes`` by another build into the same folder is never
    taken for the champion's.
    """
    from edgekit.build_output import BuildOutputError, pass_output
    from edgekit.passes import finetune, load

    config = champion.config
    if champion.out_dir is None:
        return None, (f"as the config says, from {config.model.source} (--from names a build config; pass the champion's "
                      "build output folder to start from its trained weights)")
    try:
        found = pass_output(champion.out_dir, (load.PASS.name, finetune.PASS.name))
    except BuildOutputError as error:
        return None, f"as the champion did, from {config.model.source}: {error}"
    if found is None:
        return None, f"as the champion did, from {config.model.source}: its build trained no PyTorch model"
    if found.artifact is None:
        return None, (f"as the champion did, from {config.model.source}: its trained model ({found.name} pass) is no "
                      "longer in the pass cache (evicted or cleared)")
    return found.artifact.model_path, f"from the champion's trained model (its {found.name} pass)"


def copy_model(folder: Path, destination: Path) -> Path:
    """The model files of a cache entry (no manifest, no LoRA adapter: its weights are merged) copied to ``destination``,
    which appears whole or not at all."""
    from edgekit.pipeline import ARTIFACT_FILE

    staging = destination.with_name(f".{destination.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(folder, staging, ignore=shutil.ignore_patterns(ARTIFACT_FILE, "adapter"))
    if destination.exists():
        shutil.rmtree(destination)
    staging.rename(destination)
    return destination


def lora_from(champion: FinetuneSection, family: str | None) -> FinetuneSection:
    """The champion's fine-tuning settings as LoRA, with adapters on the token embeddings as well as on its modules (the
    family's defaults unless it named some): drift brings words the champion never learned, and adapters on the
    encoder's layers alone cannot move their embeddings (a tiny BERT retrained on a new jargon: 0.32 → 1.0 on the new
    text with them, 0.29 without). A full fine-tune's learning rates (about ten times too low for adapters) give way
    to LoRA's defaults."""
    from edgekit.tasks.text_classification import LORA_TARGETS

    update: dict = {"enabled": True, "method": "lora"}
    if champion.method == "full":
        defaults = FinetuneSection()
        update |= {"learning_rate": defaults.learning_rate, "head_learning_rate": defaults.head_learning_rate}
    modules = champion.lora_target_modules or LORA_TARGETS.get(family or "")
    if modules:  # else the finetune pass says which modules to name
        update["lora_target_modules"] = list(dict.fromkeys([*modules, EMBEDDINGS_MODULE]))
    return champion.model_copy(update=update)


def challenger_config(champion: BuildConfig, *, data_path: Path, version: str, targets: list[str], search: bool,
                      start: Path | None) -> BuildConfig:
    """The champion's config with the merged data, a new version, the targets and, when ``start`` names the champion's
    trained model, that model as the source with its pooling pinned and LoRA on top."""
    from device_agent.validation import validate_model
    from edgekit.tasks.text_models import POOLING_KEY

    document = champion.model_dump()
    document["data"]["path"] = data_path
    document["model"]["version"] = version
    document["targets"] = targets or champion.targets
    document["search"]["enabled"] = search
    if start is not None:
        document["model"]["source"] = str(start)
        saved = json.loads((start / "config.json").read_text(encoding="utf-8"))
        document["head"]["pooling"] = saved.get(POOLING_KEY, "cls")  # how load_classifier reads it
        document["finetune"] = lora_from(champion.finetune, saved.get("model_type")).model_dump()
    return validate_model(document, BuildConfig, source="the challenger's build config")


# ---------------------------------------------------------------------- all of it


@dataclass(frozen=True)
class Challenger:
    """What ``edgekit build`` is handed: the challenger's config and output folder, and what the merge did."""

    config: BuildConfig
    out_dir: Path
    summary: dict


def prepare_challenger(source: Path, labelled_path: Path, *, out_dir: Path | None, version: str | None, targets: list[str],
                       new_classes: bool, search: bool, force: bool = False) -> Challenger:
    """Read the champion and the labelled rows, merge them, and write the challenger's data (and starting model) under
    its output folder; every check on the input comes before anything is written."""
    from device_agent.files import write_atomically
    from edgekit.passes.load import has_torch_stage

    champion = read_champion(source)
    config = champion.config
    if config.task.kind != TEXT_TASK:
        where = f"{champion.out_dir / BUILD_CONFIG_FILE}" if champion.out_dir else str(source)
        raise EdgekitError(f"retrain merges labelled texts; this champion is a {config.task.kind} model. Add the new "
                           f"samples to its data ({config.data.path}) yourself, raise model.version in {where}, and run "
                           "`edgekit build` with it")
    out_dir = out_dir or (champion.out_dir.with_name(f"{champion.out_dir.name}-challenger") if champion.out_dir else Path("out-challenger"))
    check_out_dir(champion, out_dir, force=force)
    if not has_torch_stage(config.model.source):
        raise EdgekitError(f"the champion was built from {config.model.source}, which edgekit does not train: retraining "
                           "needs a model it trains (a Hugging Face folder or embedded:all-minilm-l6-v2) as model.source")

    examples, cleaning = read_labelled(labelled_path, config.data)
    champion_data = champion_dataset(config)
    merge = merge_labelled(champion_data, examples)
    if merge.unknown_labels and not new_classes:
        known = ", ".join(champion_data.labels)
        raise EdgekitError(
            f"--add-data {labelled_path} has label(s) {', '.join(merge.unknown_labels)} that the champion does not know "
            f"(its {len(champion_data.labels)} classes: {known}). Retraining with new classes changes the model's head "
            "and its outputs, so devices, `edgekit compare` and rollouts treat it as a different model: fix the labels, "
            "or pass --new-classes to train one with the new classes")
    if not merge.added_rows and not merge.relabelled:
        raise EdgekitError(f"--add-data {labelled_path} adds nothing: its {merge.duplicates} labelled row(s) are all in "
                           "the champion's data with the same labels; label new samples and retry")
    new_version = next_version(config.model.version, version)

    start, starting = trained_model(champion)
    data_path = (out_dir / MERGED_DATA).resolve()
    write_merged(merge, data_path, config.data)
    if start is not None:
        start = copy_model(start, (out_dir / CHAMPION_MODEL).resolve())
    challenger = challenger_config(config, data_path=data_path, version=new_version, targets=targets, search=search, start=start)
    if start is not None:
        classes_changed = {row.label for row in merge.rows} != set(champion_data.labels)
        head = "a new head for the changed classes fitted" if classes_changed else "its head refitted"
        starting += (f", copied to {start}: {head} on the merged data, then LoRA for at most "
                     f"{challenger.finetune.epochs} epoch(s)")
    summary = _summary(champion, champion_data, merge, cleaning, challenger, out_dir, starting)
    write_atomically(out_dir / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    return Challenger(challenger, out_dir, summary)


def check_out_dir(champion: Champion, out_dir: Path, *, force: bool) -> None:
    """Refuse a challenger folder that would overwrite what the retrain reads (the champion's build output, its data,
    the folder of its config YAML), or, without ``force``, a folder that already holds something (another challenger's
    bundles of the same version, perhaps)."""
    out = out_dir.resolve()
    if champion.out_dir is not None and out == champion.out_dir.resolve():
        raise EdgekitError(f"--out {out_dir} is the champion's own build output; give the challenger another folder")
    if champion.out_dir is None and out == champion.source.resolve().parent:
        raise EdgekitError(f"--out {out_dir} is the folder of the champion's config {champion.source}; give the "
                           "challenger a folder of its own (e.g. --out out-challenger)")
    data = champion.config.data.path
    if data is not None and not str(data).startswith(PACKAGED_DATA_PREFIX) and Path(data).resolve().is_relative_to(out):
        raise EdgekitError(f"--out {out_dir} holds the champion's data ({data}), which the retrain reads and would write "
                           "beside; give the challenger a folder of its own (e.g. --out out-challenger)")
    if not force and out_dir.is_dir() and any(out_dir.iterdir()):
        raise EdgekitError(f"--out {out_dir} already holds files (an earlier challenger's bundles, perhaps: a second one "
                           "would replace them under the same version); give a new folder, or pass --force to build "
                           "into it anyway")
    if out_dir.exists() and not out_dir.is_dir():
        raise EdgekitError(f"--out {out_dir} is a file; give a folder for the challenger's build output")


def _summary(champion: Champion, data: Dataset, merge: Merge, cleaning: CleaningReport, challenger: BuildConfig,
             out_dir: Path, starting: str) -> dict:
    """What the retrain did, for the terminal, --json and ``<out>/data/retrain-summary.json``."""
    return {
        "champion": {"from": str(champion.source), "model": champion.config.model.name,
                     "version": champion.config.model.version, "labels": list(data.labels),
                     "rows": {name: len(data.split(name)) for name in SPLITS}},
        "challenger": {"out": str(out_dir), "model": challenger.model.name, "version": challenger.model.version,
                       "data": str(challenger.data.path), "training": starting, "search": bool(challenger.search.enabled)},
        "merge": {"rule": MERGE_RULE, "added": merge.added, "added_rows": merge.added_rows, "relabelled": merge.relabelled,
                  "dropped": {"already_in_champion": merge.duplicates, **cleaning.dropped()},
                  "rows_read": cleaning.rows_read, "new_labels": list(merge.unknown_labels), "warnings": list(merge.warnings)},
    }
