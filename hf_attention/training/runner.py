"""The accelerate training loop every recipe shares.

It avoids the known defects of transformers' `run_*_no_trainer.py` scripts: resuming from the latest
checkpoint really resumes (exactly: seedable sampler, `set_epoch`, RNG states), checkpoints are written
once per optimiser step (not once per micro-batch inside an accumulation step), evaluation and logging
do not depend on `--do_predict`, and mixed precision comes from `accelerate launch` alone.
"""

import argparse
import json
import math
import re
import resource
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from .tables import markdown_table

logger = get_logger(__name__)

CHECKPOINT_DIR = re.compile(r"^(step|epoch)_(\d+)$")
# Written after a checkpoint is complete: a run killed while saving never leaves a half checkpoint to resume from.
CHECKPOINT_DONE = "checkpoint_complete.json"


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    log_with = None
    if args.with_tracking and args.report_to != "none":
        log_with = args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with,
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return accelerator


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norms, embeddings' padding and 1-D parameters are left alone."""
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)
    no_decay: set[str] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, norm_types) or param_name.endswith("bias") or param.ndim < 2:
                no_decay.add(full)
    decay, rest = [], []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (rest if name in no_decay else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def latest_checkpoint(output_dir: str) -> Path | None:
    """The checkpoint folder with the most progress (epoch_N counts as the end of epoch N)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = []
    for child in folder.iterdir():
        match = CHECKPOINT_DIR.match(child.name)
        if child.is_dir() and match and (child / CHECKPOINT_DONE).exists():
            done = json.loads((child / CHECKPOINT_DONE).read_text())
            found.append((done["completed_steps"], child.stat().st_mtime, child))
    return max(found)[2] if found else None


def checkpoint_state(checkpoint: Path, num_processes: int) -> dict[str, Any]:
    """What `save_checkpoint` recorded with the checkpoint; a clear error if the checkpoint was never finished."""
    done = checkpoint / CHECKPOINT_DONE
    if done.exists():
        return json.loads(done.read_text())
    # accelerate's save_state names (safetensors, .bin, or an FSDP folder for the weights).
    expected = [("model.safetensors", "pytorch_model.bin", "pytorch_model_fsdp_0"), ("optimizer.bin",),
                ("scheduler.bin",)] + [(f"random_states_{rank}.pkl",) for rank in range(num_processes)]
    missing = [" or ".join(names) for names in expected if not any((checkpoint / n).exists() for n in names)]
    if not missing:  # written before the completion marker existed: all its states are there
        logger.warning(f"{checkpoint} has no {CHECKPOINT_DONE}; resuming from its states alone")
        return {}
    present = ", ".join(sorted(p.name for p in checkpoint.iterdir())) or "nothing"
    raise SystemExit(
        f"--resume_from_checkpoint {checkpoint}: the checkpoint is incomplete (its saving was interrupted): "
        f"missing {', '.join(missing + [CHECKPOINT_DONE])}; it holds {present}. Resume from a complete checkpoint "
        "(--resume_from_checkpoint without a value takes the latest complete one in --output_dir)."
    )


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class JsonlLogger:
    """A plain log that is always written (main process), whatever trackers are on.

    One run has one log: a fresh run starts it anew, a resumed run cuts it back to what it held when its
    checkpoint was saved, so no step appears twice and no record of the abandoned attempt survives.
    """

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def log(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record, default=float) + "\n")

    def num_records(self) -> int:
        return len(self.path.read_text().splitlines()) if self.path.exists() else 0

    def restart(self, keep_records: int | None = 0, max_step: int | None = None) -> None:
        """Keep the first `keep_records` records (0: start afresh); `None`: those up to `max_step`."""
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        if keep_records is not None:
            kept = lines[:keep_records]
        else:  # a checkpoint from before record counts were saved
            kept = [line for line in lines if json.loads(line).get("step", 0) <= (max_step or 0)]
        self.path.write_text("".join(line + "\n" for line in kept))


def tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """Trackers accept scalars and strings only."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}


class RecipeRunner:
    """Owns the accelerate objects and the loop; a recipe supplies data, a model and an evaluate function."""

    def __init__(self, args: argparse.Namespace, accelerator: Accelerator):
        self.args = args
        self.accelerator = accelerator
        self.output_dir = Path(args.output_dir)
        self.jsonl = JsonlLogger(self.output_dir / "log.jsonl", accelerator.is_main_process)
        self.completed_steps = 0
        self.train_loss: float | None = None
        # Training time and samples are cumulative over resumes (saved with each checkpoint), so a resumed
        # run reports the time the whole training took, not only its last part.
        self.train_runtime = 0.0
        self.train_samples = 0
        self._runtime_before = 0.0
        self._started = time.perf_counter()
        self._running_loss, self._running_count = 0.0, 0

    def init_trackers(self, task: str) -> None:
        if not self.args.with_tracking or self.args.report_to == "none":
            return
        run_name = self.args.run_name or self.output_dir.name
        init_kwargs: dict[str, dict[str, Any]] = {"wandb": {"name": run_name, "dir": str(self.output_dir)}}
        if self.args.sweep_name:
            init_kwargs["wandb"]["group"] = self.args.sweep_name
            init_kwargs["wandb"]["tags"] = [self.args.sweep_name, task]
        self.accelerator.init_trackers(self.args.project_name, config=tracker_config(self.args),
                                       init_kwargs=init_kwargs)

    def log(self, values: dict[str, Any], step: int) -> None:
        self.jsonl.log({"step": step, **values})
        if self.args.with_tracking and self.args.report_to != "none":
            self.accelerator.log(values, step=step)

    def train(
        self,
        model: torch.nn.Module,
        train_dataloader,
        evaluate: Callable[[torch.nn.Module, int], dict[str, float]] | None = None,
        loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] | None = None,
    ) -> torch.nn.Module:
        """`loss_fn(model, batch)` is where random augmentation belongs (after the per-step seeding), not collate.

        Train with accumulation, clipping, scheduling, checkpoints and exact resume; returns the prepared model."""
        args, accelerator = self.args, self.accelerator
        if args.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW(
            optimizer_groups(model, args.weight_decay), lr=args.learning_rate,
            betas=(getattr(args, "adam_beta1", 0.9), getattr(args, "adam_beta2", 0.999)),
            eps=getattr(args, "adam_epsilon", 1e-8),
        )
        processes = accelerator.num_processes
        updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps / processes)
        max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
        num_epochs = math.ceil(max_steps / max(updates_per_epoch, 1))
        scheduler = get_scheduler(
            args.lr_scheduler_type, optimizer=optimizer,
            num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
            num_training_steps=max_steps * accelerator.num_processes,
            scheduler_specific_kwargs=(
                {"min_lr_rate": args.min_lr_rate} if args.lr_scheduler_type == "cosine_with_min_lr" else None
            ),
        )
        model, optimizer, train_dataloader, scheduler = accelerator.prepare(
            model, optimizer, train_dataloader, scheduler
        )
        updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        num_epochs = math.ceil(max_steps / max(updates_per_epoch, 1))

        start_epoch, resume_batches, state = 0, 0, {}
        if args.resume_from_checkpoint is not None:
            checkpoint = (
                Path(args.resume_from_checkpoint) if args.resume_from_checkpoint else latest_checkpoint(args.output_dir)
            )
            if checkpoint is None or not checkpoint.is_dir():
                raise SystemExit(
                    f"--resume_from_checkpoint: no checkpoint found "
                    f"({args.resume_from_checkpoint or 'latest in ' + args.output_dir})"
                )
            match = CHECKPOINT_DIR.match(checkpoint.name)
            if match is None:
                raise SystemExit(f"--resume_from_checkpoint {checkpoint}: expected a step_N or epoch_N folder")
            state = checkpoint_state(checkpoint, accelerator.num_processes)
            accelerator.print(f"Resuming from {checkpoint}")
            accelerator.load_state(str(checkpoint))
            kind, number = match.groups()
            if kind == "epoch":
                start_epoch = int(number) + 1
                self.completed_steps = state.get("completed_steps", (int(number) + 1) * updates_per_epoch)
            else:
                self.completed_steps = int(number)
                start_epoch = self.completed_steps // updates_per_epoch
                resume_batches = (self.completed_steps % updates_per_epoch) * args.gradient_accumulation_steps
            self.jsonl.restart(state.get("log_records"), max_step=self.completed_steps)
        else:
            self.jsonl.restart(0)
        self._runtime_before = state.get("train_runtime", 0.0)
        self.train_samples = state.get("train_samples", 0)
        self._running_loss, self._running_count = state.get("running_loss", 0.0), state.get("running_count", 0)
        epoch_losses = [state["train_loss"]] if state.get("train_loss") is not None else []
        progress = tqdm(total=max_steps, initial=self.completed_steps, disable=not accelerator.is_local_main_process)
        micro_batch = self.completed_steps * args.gradient_accumulation_steps
        step_every = int(args.checkpointing_steps) if str(args.checkpointing_steps).isdigit() else None
        self._started = time.perf_counter()
        # A run resumed from its last checkpoint has nothing left to train (and must not take one step more).
        last_epoch = num_epochs if self.completed_steps < max_steps else start_epoch
        for epoch in range(start_epoch, last_epoch):
            model.train()
            if hasattr(train_dataloader, "set_epoch"):
                train_dataloader.set_epoch(epoch)
            batches = train_dataloader
            if epoch == start_epoch and resume_batches:
                batches = accelerator.skip_first_batches(train_dataloader, resume_batches)
            pending_checkpoint = None
            for batch in batches:
                # Dropout and augmentation draw from an RNG seeded by (seed, micro-batch, rank), not by history:
                # libraries draw from the global RNG at unpredictable points (iterator starts, prefetching), and
                # a resumed run must still see exactly the randomness of the uninterrupted one.
                micro_batch += 1
                torch.manual_seed(hash((args.seed, micro_batch, accelerator.process_index)) & 0x7FFFFFFF)
                with accelerator.accumulate(model):
                    loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                detached = loss.detach().float()
                self._running_loss += float(accelerator.reduce(detached, reduction="mean"))
                self._running_count += 1
                self.train_samples += _batch_size(batch) * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                self.completed_steps += 1
                mean = self._running_loss / max(self._running_count, 1)
                progress.set_postfix(loss=f"{mean:.4f}", refresh=False)
                progress.update(1)
                if self.completed_steps % args.logging_steps == 0 or self.completed_steps == max_steps:
                    epoch_losses.append(mean)
                    self.log({"train_loss": mean, "learning_rate": scheduler.get_last_lr()[0], "epoch": epoch},
                             step=self.completed_steps)
                    self._running_loss, self._running_count = 0.0, 0
                last_of_epoch = self.completed_steps % updates_per_epoch == 0 or self.completed_steps >= max_steps
                if step_every and self.completed_steps % step_every == 0:
                    # At an epoch's end the checkpoint waits for the evaluation, so resuming from it redoes nothing
                    # and skips nothing (the log keeps that evaluation).
                    if last_of_epoch:
                        pending_checkpoint = f"step_{self.completed_steps}"
                    else:
                        self.save_checkpoint(f"step_{self.completed_steps}", epoch_losses)
                if self.completed_steps >= max_steps:
                    break
            if self._running_count:
                epoch_losses.append(self._running_loss / self._running_count)
                self._running_loss, self._running_count = 0.0, 0
            if evaluate is not None and args.do_eval:
                metrics = evaluate(model, epoch)
                self.log({**metrics, "epoch": epoch}, step=self.completed_steps)
                accelerator.print(f"epoch {epoch}: {metrics}")
            if pending_checkpoint:
                self.save_checkpoint(pending_checkpoint, epoch_losses)
            if args.checkpointing_steps == "epoch":
                self.save_checkpoint(f"epoch_{epoch}", epoch_losses)
            if self.completed_steps >= max_steps:
                break
        progress.close()
        self.train_runtime = self._runtime_before + time.perf_counter() - self._started
        self.train_loss = epoch_losses[-1] if epoch_losses else None
        return model

    def save_checkpoint(self, name: str, epoch_losses: list[float] | None = None) -> None:
        """accelerate's states, then the marker that says they are complete and what resuming needs besides."""
        folder = self.output_dir / name
        self.accelerator.save_state(str(folder))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            record = {
                "completed_steps": self.completed_steps,
                "log_records": self.jsonl.num_records(),
                "train_runtime": self._runtime_before + time.perf_counter() - self._started,
                "train_samples": self.train_samples,
                "running_loss": self._running_loss,
                "running_count": self._running_count,
                "train_loss": epoch_losses[-1] if epoch_losses else None,
            }
            (folder / CHECKPOINT_DONE).write_text(json.dumps(record))

    def finish(self, model: torch.nn.Module, processor, metrics: dict[str, Any], card: str,
               extra_files: dict[str, Any] | None = None) -> dict[str, Any]:
        """Save the model folder (weights, processor, generation config), all_results.json and a model card."""
        accelerator, args = self.accelerator, self.args
        accelerator.wait_for_everyone()
        unwrapped = accelerator.unwrap_model(model)
        results = dict(metrics)
        results.update({
            "train_loss": self.train_loss,
            "train_runtime": round(self.train_runtime, 3),
            "train_samples_per_second": (
                round(self.train_samples / self.train_runtime, 3) if self.train_runtime else None
            ),
            "train_steps": self.completed_steps,
            "num_parameters": sum(p.numel() for p in unwrapped.parameters()),
            "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
            "num_processes": accelerator.num_processes,
        })
        if accelerator.is_main_process:
            unwrapped.save_pretrained(args.output_dir, is_main_process=True, save_function=accelerator.save)
            if processor is not None:
                processor.save_pretrained(args.output_dir)
            (self.output_dir / "all_results.json").write_text(json.dumps(results, indent=2, default=float))
            (self.output_dir / "README.md").write_text(card + "\n" + _metrics_markdown(results))
            for name, content in (extra_files or {}).items():
                (self.output_dir / name).write_text(json.dumps(content, indent=2) if not isinstance(content, str)
                                                    else content)
        self.log({k: v for k, v in results.items() if isinstance(v, (int, float))}, step=self.completed_steps)
        if args.with_tracking and args.report_to != "none":
            accelerator.end_training()
        if args.push_to_hub and accelerator.is_main_process:
            push_folder(args)
        accelerator.wait_for_everyone()
        return results


def push_folder(args: argparse.Namespace) -> None:
    """Upload the model folder (not the step_/epoch_ training states) to the Hub."""
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    api.create_repo(args.hub_model_id, exist_ok=True, token=args.hub_token)
    api.upload_folder(
        repo_id=args.hub_model_id, folder_path=args.output_dir, commit_message="End of training",
        ignore_patterns=["step_*", "epoch_*", "log.jsonl", "wandb/*", "runs/*", "tensorboard/*", "*.pt"],
        token=args.hub_token,
    )


def _batch_size(batch) -> int:
    # BatchEncoding (what DataCollatorWithPadding returns) is a UserDict, not a dict: test for Mapping.
    for value in (batch.values() if isinstance(batch, Mapping) else batch):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return 0


def _metrics_markdown(results: dict[str, Any]) -> str:
    return f"\n## Results\n\n{markdown_table(['metric', 'value'], list(results.items()))}\n"


def model_card(task: str, args: argparse.Namespace, config, dataset_desc: str) -> str:
    variant = ", ".join(
        f"{name}={getattr(config, name)}" for name in (
            "attention_type", "position_embedding_type", "sparse_pattern", "norm_position"
        ) if getattr(config, name, None) is not None
    )
    return (
        f"---\nlibrary_name: transformers\ntags:\n- hf_attention\n- {task}\n---\n\n"
        f"# {Path(args.output_dir).name}\n\n"
        f"Trained with the hf_attention `{task}` recipe.\n\n"
        f"- Model type: `{getattr(config, 'model_type', '?')}` ({type(config).__name__})\n"
        f"- Attention variant: {variant or 'source architecture'}\n"
        f"- Data: {dataset_desc}\n"
        f"- Started from: {args.model_name_or_path or 'random initialisation'}\n"
        f"- Seed: {args.seed}; learning rate {args.learning_rate}; epochs {args.num_train_epochs}; "
        f"max steps {args.max_train_steps}\n\n"
        "Load it with `AutoModel*.from_pretrained(path, trust_remote_code=True)`.\n"
    )
