"""finetune: adapt the model to the build's data with LoRA (peft) or full fine-tuning, CUDA when present.

The load pass has already fitted the head, so training starts from a sensible
classifier. LoRA adapters go on the encoder's attention and feed-forward
projections (per architecture, overridable); the head is trained fully. Each
epoch is judged on the validation split; training stops early when it stops
improving, and the best epoch's weights are kept. The adapter is saved on its
own (``adapter/``) and merged into the base weights, so export sees a plain
Hugging Face model. Several GPUs: run the same build under ``accelerate launch``.
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


def options_for(config: BuildConfig, target: TargetProfile | None) -> Options:
    return Options(finetune=config.finetune, max_length=config.task.max_length)


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


def run(artifact: Artifact, options: Options, ctx: PassContext) -> Artifact:
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    from device_agent.preprocess import TextTokenizer
    from edgekit.measure import classification_metrics

    settings = options.finetune
    torch.manual_seed(settings.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForSequenceClassification.from_pretrained(artifact.directory)
    trainable = _lora_model(model, settings) if settings.method == "lora" else model
    trainable.to(device)
    tokenizer = TextTokenizer(artifact.task.tokenizer_file, options.max_length)
    train, val = ctx.data.train, ctx.data.val
    if settings.max_train_rows:
        train = train.head(settings.max_train_rows)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    optimizer = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad],
                                  lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * steps_per_epoch * settings.epochs),
                                               steps_per_epoch * settings.epochs)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda" and torch.cuda.is_bf16_supported())

    def evaluate() -> float:
        trainable.eval()
        predictions = []
        with torch.inference_mode(), autocast:
            for start in range(0, len(val), 64):
                batch = {k: torch.from_numpy(v).to(device) for k, v in tokenizer.encode(val.texts[start:start + 64]).items()}
                predictions.append(trainable(**batch).logits.float().argmax(-1).cpu().numpy())
        trainable.train()
        return classification_metrics(val.labels, np.concatenate(predictions), ctx.data.labels).accuracy

    before = evaluate()
    best_accuracy, best_state, best_epoch, losses = before, None, 0, []
    generator = torch.Generator().manual_seed(settings.seed)
    started, seen = time.perf_counter(), 0
    progress = ctx.progress.add_task(f"fine-tuning ({settings.method}, {device})", total=steps_per_epoch * settings.epochs)
    trainable.train()
    for epoch in range(1, settings.epochs + 1):
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
            seen += len(indices)
            losses.append(loss.item())
            ctx.progress.update(progress, advance=1, description=f"fine-tuning epoch {epoch} loss {np.mean(losses[-20:]):.3f} (val acc {best_accuracy:.3f})")
        accuracy = evaluate()
        ctx.say(f"finetune: epoch {epoch}: validation accuracy {accuracy:.4f} (head only: {before:.4f})")
        if accuracy > best_accuracy:
            best_accuracy, best_epoch = accuracy, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in trainable.state_dict().items()}
        elif epoch - best_epoch >= settings.early_stopping_patience:
            break
    ctx.progress.remove_task(progress)
    seconds = time.perf_counter() - started
    if best_state is not None:
        trainable.load_state_dict(best_state)
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
    metrics = {
        "method": settings.method, "device": device, "val_accuracy_head_only": before, "val_accuracy": best_accuracy,
        "best_epoch": best_epoch, "epochs_run": epoch, "seconds": seconds, "samples_per_second": seen / seconds,
        "loss_curve": [float(np.mean(losses[i:i + steps_per_epoch // 4 or 1])) for i in range(0, len(losses), steps_per_epoch // 4 or 1)],
        "kept": "fine-tuned" if best_state is not None else "the head-only model (fine-tuning did not beat it on validation)",
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
