"""finetune: adapt the model to the build's data with LoRA (peft) or full fine-tuning, CUDA when present.

The load pass has already fitted the head, so training starts from a sensible
classifier. LoRA adapters go on the encoder's attention and feed-forward
projections (per architecture, overridable); the head is trained fully. Each
epoch is judged on the validation split; training stops early when it stops
improving, and the best epoch's weights are kept. The adapter is saved on its
own (``adapter/``) and merged into the base weights, so export sees a plain
Hugging Face model.

Before training, the step's memory is estimated (``edgekit.memory``) so a batch
too large for the host is a clear message rather than an OOM kill. After each
epoch a checkpoint (weights, optimizer, schedule, shuffling state) goes to the
pass's checkpoint folder, so a build interrupted mid-training resumes after its
last finished epoch. The report carries test accuracy and macro F1 of the
head-only model and of the fine-tuned one, side by side.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import replace

from pydantic import BaseModel, ConfigDict

from edgekit.artifact import Artifact, Pass, PassContext, Stage
from edgekit.config import BuildConfig, FinetuneSection
from edgekit.errors import EdgekitError
from edgekit.passes.load import TOKENIZER_FILES
from edgekit.targets import TargetProfile

# Linear layers that LoRA adapts, by model family (the Hugging Face module names).
LORA_TARGETS = {
    "bert": ("query", "key", "value", "dense"),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
    "roberta": ("query", "key", "value", "dense"),
}


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    finetune: FinetuneSection
    max_length: int
    augment: str | None = None  # image models: the training images' augmentation (train.augment), fine-tuning as training


def options_for(config: BuildConfig, target: TargetProfile | None) -> Options:
    augment = config.train.augment if config.task.kind == "image-classification" else None
    return Options(finetune=config.finetune, max_length=config.task.max_length, augment=augment)


def _lora_model(model, settings: FinetuneSection):
    from peft import LoraConfig, TaskType, get_peft_model

    family = model.config.model_type
    targets = settings.lora_target_modules or LORA_TARGETS.get(family)
    if not targets:
        raise EdgekitError(f"no default LoRA target modules for {family!r} models; set finetune.lora_target_modules")
    available = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules()})
    missing = [name for name in targets if name not in available]
    if missing:
        raise EdgekitError(
            f"LoRA target modules {missing} do not exist in this {family} model; "
            f"set finetune.lora_target_modules to some of: {', '.join(available)}"
        )
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=settings.lora_r, lora_alpha=settings.lora_alpha,
                        lora_dropout=settings.lora_dropout, target_modules=list(targets), modules_to_save=["classifier", "pooler"])
    return get_peft_model(model, config)


def _check_memory(model, settings: FinetuneSection, max_length: int, device: str) -> None:
    from edgekit.memory import check_fits, transformer_step_bytes

    config = model.config
    needed = transformer_step_bytes(
        settings.batch_size, max_length, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
        getattr(config, "intermediate_size", 4 * config.hidden_size), sum(p.numel() for p in model.parameters()),
    )
    check_fits(needed, device, f"finetune.batch_size {settings.batch_size} at task.max_length {max_length}",
               "lower finetune.batch_size or task.max_length")


def run(artifact: Artifact, options: Options, ctx: PassContext) -> Artifact:
    if artifact.task.image is not None:  # image models: full fine-tuning in the image task's plain PyTorch loop
        from edgekit.tasks.image_classification import finetune

        return finetune(artifact, options.finetune, ctx, augment=options.augment or "none")
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    from device_agent.preprocess import TextTokenizer
    from edgekit.checkpoints import Checkpoints
    from edgekit.measure import classification_metrics

    settings = options.finetune
    torch.manual_seed(settings.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForSequenceClassification.from_pretrained(artifact.directory)
    _check_memory(model, settings, options.max_length, device)
    trainable = _lora_model(model, settings) if settings.method == "lora" else model
    trainable.to(device)
    tokenizer = TextTokenizer(artifact.task.tokenizer_file, options.max_length)
    train, val, test = ctx.data.train, ctx.data.val, ctx.data.test
    if settings.max_train_rows:
        train = train.head(settings.max_train_rows)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    optimizer = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad],
                                  lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * steps_per_epoch * settings.epochs),
                                               steps_per_epoch * settings.epochs)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda" and torch.cuda.is_bf16_supported())

    def predict(split) -> np.ndarray:
        trainable.eval()
        predictions = []
        with torch.inference_mode(), autocast:
            for start in range(0, len(split), 64):
                batch = {k: torch.from_numpy(v).to(device) for k, v in tokenizer.encode(split.texts[start:start + 64]).items()}
                predictions.append(trainable(**batch).logits.float().argmax(-1).cpu().numpy())
        trainable.train()
        return np.concatenate(predictions)

    def evaluate(split):
        return classification_metrics(split.labels, predict(split), ctx.data.labels)

    checkpoints = Checkpoints(ctx.checkpoint_dir)
    generator = torch.Generator().manual_seed(settings.seed)
    resumed = checkpoints.latest()
    if resumed is None:
        head_only_val, head_only_test = evaluate(val), evaluate(test)
        state = {"best_accuracy": head_only_val.accuracy, "best_state": None, "best_epoch": 0, "losses": [], "seen": 0, "seconds": 0.0,
                 "head_only_val": head_only_val.accuracy, "head_only_test": head_only_test.to_dict()}
        first_epoch = 1
    else:
        # An earlier run of this same pass (same model, data and settings) was interrupted: go on after its last epoch.
        trainable.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        schedule.load_state_dict(resumed["schedule"])
        generator.set_state(resumed["generator"])
        state = resumed["state"]
        first_epoch = resumed["epoch"] + 1
        ctx.say(f"finetune: resuming after epoch {resumed['epoch']} from {ctx.checkpoint_dir}")
    started = time.perf_counter() - state["seconds"]
    progress = ctx.progress.add_task(f"fine-tuning ({settings.method}, {device})", total=steps_per_epoch * settings.epochs,
                                     completed=steps_per_epoch * (first_epoch - 1))
    trainable.train()
    losses = state["losses"]
    epoch = first_epoch - 1
    for epoch in range(first_epoch, settings.epochs + 1):
        if state.get("stopped_early"):  # the interrupted run had already decided to stop
            epoch -= 1
            break
        for rows in torch.randperm(len(train), generator=generator).split(settings.batch_size):
            indices = rows.numpy()
            batch = {k: torch.from_numpy(v).to(device) for k, v in tokenizer.encode([train.texts[i] for i in indices]).items()}
            labels = torch.from_numpy(train.labels[indices]).to(device)
            with autocast:
                loss = trainable(**batch, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            state["seen"] += len(indices)
            losses.append(loss.item())
            ctx.progress.update(progress, advance=1, description=f"fine-tuning epoch {epoch} loss {np.mean(losses[-20:]):.3f} (val acc {state['best_accuracy']:.3f})")
        accuracy = evaluate(val).accuracy
        ctx.say(f"finetune: epoch {epoch}: validation accuracy {accuracy:.4f} (head only: {state['head_only_val']:.4f})")
        improved = accuracy > state["best_accuracy"]
        if improved:
            state.update(best_accuracy=accuracy, best_epoch=epoch,
                         best_state={k: v.detach().cpu().clone() for k, v in trainable.state_dict().items()})
        state["stopped_early"] = not improved and epoch - state["best_epoch"] >= settings.early_stopping_patience
        state["seconds"] = time.perf_counter() - started
        checkpoints.save(epoch, {"model": trainable.state_dict(), "optimizer": optimizer.state_dict(),
                                 "schedule": schedule.state_dict(), "generator": generator.get_state(), "state": state})
        if state["stopped_early"]:
            break
    ctx.progress.remove_task(progress)
    seconds = time.perf_counter() - started
    if state["best_state"] is not None:
        trainable.load_state_dict(state["best_state"])
    tuned_test = evaluate(test)
    trainable.to("cpu")
    if settings.method == "lora":
        trainable.save_pretrained(ctx.work_dir / "adapter")
        merged = trainable.merge_and_unload()
    else:
        merged = trainable
    merged.save_pretrained(ctx.work_dir)
    for name in TOKENIZER_FILES:
        if (artifact.directory / name).is_file():
            shutil.copy(artifact.directory / name, ctx.work_dir / name)
    quarter = steps_per_epoch // 4 or 1
    head_only_test = state["head_only_test"]
    metrics = {
        "method": settings.method, "device": device, "val_accuracy_head_only": state["head_only_val"], "val_accuracy": state["best_accuracy"],
        "test_accuracy_head_only": head_only_test["accuracy"], "test_accuracy": tuned_test.accuracy,
        "test_f1_macro_head_only": head_only_test["f1_macro"], "test_f1_macro": tuned_test.f1_macro,
        "best_epoch": state["best_epoch"], "epochs_run": epoch, "resumed_after_epoch": first_epoch - 1 or None,
        "seconds": seconds, "samples_per_second": state["seen"] / seconds if seconds else None,
        "loss_curve": [float(np.mean(losses[i:i + quarter])) for i in range(0, len(losses), quarter)],
        "kept": "fine-tuned" if state["best_state"] is not None else "the head-only model (fine-tuning did not beat it on validation)",
    }
    task = replace(artifact.task, tokenizer_file=ctx.work_dir / "tokenizer.json")
    return Artifact(Stage.TORCH, ctx.work_dir, ".", artifact.digest, task, metrics={**artifact.metrics, "finetune": metrics})


PASS = Pass(
    name="finetune",
    version=1,
    takes=frozenset({Stage.TORCH}),
    gives=Stage.TORCH,
    target_specific=False,
    uses_data=True,
    libraries=("torch", "transformers", "peft"),
    options_for=options_for,
    run=run,
)
