"""The training loop of train.py: ranks, data order, steps, logs, pictures and resumable checkpoints.

The loop is the same for every stage; what a step computes comes from the stage's objective
(sparsefusion/joint_objective.py: EFT + VLDM as upstream; sparsefusion/vae_objective.py: the VAE).
One step takes one scene (views_per_scene random frames of a sequence, the same frames whichever
process loads it and whether or not the run resumed), asks the objective for a batch and its losses,
backpropagates once, and steps every optimizer and then its scheduler.

Files under exp_dir: the stage's checkpoints ckpt_latest*.pt every save_itr steps and at the last
step, ckpt_{step:06d}*.pt every archive_itr steps; the first file of a checkpoint also holds the
'train_config' and every rank's 'rng_state', so a rerun resumes weights, optimizers, schedulers,
step, data position and random state. config.yaml, log/train_{step:06d}.jpg (the objective's picture),
log/losses.csv (step, lr and each loss term every log_itr steps, across resumed runs), log/_loss.png
(its curves) and tensorboard/ (scalars and the same pictures).

    config = load_config("configs/train_small.yaml", ["category=hydrant", "dataset=synthetic"])
    run_training(config)                       # -g N processes, or the torchrun ones
"""

import re
import signal
import sys
import threading
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from sparsefusion.atomic_files import remove_stale_temporaries, writable_folder_problems
from sparsefusion.checkpoint import TRAINING_KEYS, config_to_dict, file_problem, load_file
from sparsefusion.checkpoint_commit import finish_interrupted_commits, pending_path, remove_uncommitted, save_together
from sparsefusion.data import CO3DDataset, load_dataset
from sparsefusion.distributed import check_gpu_count, launch, under_torchrun
from sparsefusion.errors import UserError, problems_of, raise_problems
from sparsefusion.joint_objective import JointObjective
from sparsefusion.outputs import plot_losses, write_image, write_text
from sparsefusion.precision import autocast, set_matmul_precision
from sparsefusion.progress import progress_bar
from sparsefusion.training import RANDOM_VAE, apply_schedule, check_config, config_yaml, resume_conflicts, schedule_changes
from sparsefusion.vae import WHERE_TO_GET as VAE_WHERE_TO_GET
from sparsefusion.vae import read_vae
from sparsefusion.vae_objective import VAEObjective

OBJECTIVES = {"joint": JointObjective, "vae": VAEObjective}


def train_step(model, objective, batch, precision, device):
    """Run one optimisation step and return the detached losses {name: scalar} of objective.loss_names.

    model: the objective's model, or its DDP wrapper. As upstream: zero every gradient, one backward
    of the total, then each optimizer step followed by its scheduler step (in the objective's order).
    """
    for optimizer in objective.optimizers:
        optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        losses = model(batch)
    losses["total"].backward()
    for optimizer, scheduler in zip(objective.optimizers, objective.schedulers):
        optimizer.step()
        scheduler.step()
    return {name: losses[name].detach() for name in objective.loss_names}


# ---------------------------------------------------------------------------------------------
# Data, checkpoints, random state


INIT_WEIGHTS = ("init_eft", "init_vldm", "init_vae")  # TrainConfig's weights to start from


def input_problems(config):
    """Return one line for each input file the config names that is missing or a folder: the VAE, init checkpoints."""
    problems = []
    if config.stage == "joint" and config.vae != RANDOM_VAE:
        problem = file_problem(config.vae, "VAE checkpoint", VAE_WHERE_TO_GET)
        if problem:
            problems.append(f"{problem} (or pass -a/--vae PATH, e.g. a stage=vae run's ckpt_latest_vae.pt)")
    for name in INIT_WEIGHTS:
        path = getattr(config, name)
        problem = path and file_problem(path, f"{name} checkpoint")
        if problem:
            problems.append(problem)
    return problems


def check_inputs(config):
    """Raise one UserError naming every missing input file and, for -g N > 1, every unreadable one."""
    problems = input_problems(config)
    if not problems and config.gpus > 1:  # before N ranks would each find it
        problems += problems_of(*content_checks(config))
    raise_problems(problems)


def content_checks(config):
    """Return checks (callables raising UserError) that read the input files the config names."""
    checks = []
    if config.stage == "joint" and config.vae != RANDOM_VAE:
        checks.append(lambda: read_vae(config.vae, config.autoencoder))
    checks += [lambda name=name: load_file(getattr(config, name), f"{name} checkpoint")
               for name in INIT_WEIGHTS if getattr(config, name)]
    return checks


def checkpoint_bytes(config):
    """Return about the bytes a stage's checkpoint files take: fp32 weights and Adam's two moments, per model."""
    # no ImageNet file is read; the frozen LPIPS of the VAE stage is not saved
    counted = replace(config, eft=replace(config.eft, backbone_weights="random"), perceptual_weight=0.0)
    with torch.device("meta"):
        model = OBJECTIVES[config.stage].build_model(counted)
    return 3 * 4 * sum(parameter.numel() for parameter in model.parameters())


def preflight(config):
    """Raise one UserError listing every problem found before training starts: inputs, dataset, exp_dir."""
    problems = problems_of(lambda: check_inputs(config), lambda: open_dataset(config))
    # the new checkpoint is written beside the old one, and archived ones add up
    problems += writable_folder_problems(config.exp_dir, 2 * checkpoint_bytes(config), "exp_dir")
    raise_problems(problems)


def open_dataset(config):
    """Return the training scenes the config names (UserError if they are missing)."""
    return load_dataset(config.dataset, config.root, config.category, subset=config.subset, split=config.split,
                        sample_batch_size=config.views_per_scene, image_size=config.image_size,
                        resize_mode=config.resize_mode)


class SeededScenes(torch.utils.data.Dataset):
    """dataset[(epoch, index)]: scene index, its random frames seeded by (seed, epoch, index).

    The frame choice is then the same whichever worker loads it and whether or not the run resumed.
    """

    def __init__(self, dataset, seed):
        self.dataset = dataset
        self.seed = seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        if isinstance(self.dataset, CO3DDataset):
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + index)
            return self.dataset.scene(index, generator)
        return self.dataset[index]


def rng_state(device):
    """Return this process's random state: {'torch': CPU state, 'cuda': the device's state or None}."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def tensorboard_writer(folder):
    """Return a TensorBoard SummaryWriter writing to folder; UserError if tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise UserError("TensorBoard logging needs the tensorboard package: pip install tensorboard, "
                        "or set tensorboard=false") from err
    return SummaryWriter(str(folder))


def seed_rank(seed, rank):
    """Seed the global CPU and CUDA generators of a rank: every rank draws its own steps."""
    torch.manual_seed(seed + rank)


class LossLog:
    """log/losses.csv: one row per logged interval (step, lr, mean losses), kept across resumed runs."""

    def __init__(self, path, columns):
        self.path, self.columns = Path(path), tuple(columns)

    def read(self):
        """Return the rows as dicts of floats (step as int); [] when there is no file."""
        if not self.path.is_file():
            return []
        lines = self.path.read_text().splitlines()
        header = lines[0].split(",")
        rows = [dict(zip(header, map(float, line.split(",")))) for line in lines[1:] if line]
        for row in rows:
            row["step"] = int(row["step"])
        return rows

    def _line(self, row):
        return ",".join(str(int(row[c])) if c == "step" else repr(float(row[c])) for c in self.columns) + "\n"

    def append(self, row):
        """Append a row {column: value}; the header is written with the first row."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file()
        with open(self.path, "a") as f:
            f.write((",".join(self.columns) + "\n" if new else "") + self._line(row))

    def truncate_after(self, step):
        """Drop the rows after step (the run resumes there), rewriting the file atomically."""
        rows = self.read()
        kept = [row for row in rows if row["step"] <= step]
        if len(kept) < len(rows):
            write_text(",".join(self.columns) + "\n" + "".join(self._line(row) for row in kept), self.path)


def ignore_stop_signals(worker_id):
    """DataLoader workers leave SIGINT/SIGTERM (sent to the whole process group) to the training process."""
    for sig in StopRequest.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopRequest:
    """Notes SIGINT and SIGTERM instead of dying, so the loop can stop between steps with a checkpoint."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal_name = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self.previous = {sig: signal.signal(sig, self._note) for sig in self.SIGNALS}

    def _note(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def agreed(self, rank):
        """Return whether any rank was asked to stop (collective when there are several ranks)."""
        if rank.world_size == 1:
            return self.signal_name is not None
        flag = torch.tensor([float(self.signal_name is not None)], device=rank.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signal_name is None:
            self.signal_name = "another rank's signal"
        return bool(flag.item())

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """One rank's training of a stage: objective, data, checkpoints and (on rank 0) logs; train() runs it."""

    def __init__(self, config, rank):
        check_config(config)
        self.config = config
        self.rank = rank
        self.device = rank.device
        self.exp_dir = Path(config.exp_dir)
        set_matmul_precision(config.precision)
        torch.backends.cudnn.benchmark = True  # fixed shapes but for the 2–5 context views: autotune once each

        self.dataset = SeededScenes(open_dataset(config), config.seed)
        torch.manual_seed(config.seed)  # identical initial weights on every rank
        self.objective = OBJECTIVES[config.stage](config, self.device, self.dataset)

        self.step = 0
        self.saved_step = None  # the step of exp_dir's latest checkpoint, once there is one
        seed_rank(config.seed, rank.rank)
        if rank.is_main:
            self.finish_interrupted_saves()
        if rank.world_size > 1:
            dist.barrier()
        if self.resumable():
            self.resume()
        else:
            self.objective.load_initial_weights()
        if rank.is_main:
            remove_uncommitted(self.exp_dir)
            remove_stale_temporaries(self.exp_dir)
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)  # every loss since checked_step was
        self.checked_step = self.step
        self.model = self.objective.model
        self.ddp = self.model
        if rank.world_size > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, find_unused_parameters=self.objective.find_unused_parameters)

        self.loss_log = LossLog(self.exp_dir / "log" / "losses.csv", ("step", "lr") + self.objective.loss_names)
        self.last_losses = None
        self.writer = None
        if rank.is_main:
            self.exp_dir.mkdir(parents=True, exist_ok=True)
            self.loss_log.truncate_after(self.step)  # rows a stopped run logged after its last checkpoint
            write_text(config_yaml(config), self.exp_dir / "config.yaml")
            if config.tensorboard:
                self.writer = tensorboard_writer(self.exp_dir / "tensorboard")

    # -- data order ---------------------------------------------------------------------------

    def epoch_keys(self, epoch):
        """Return this rank's (epoch, scene index) keys of an epoch: a DistributedSampler's order, as upstream."""
        sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=self.rank.world_size,
                                                      rank=self.rank.rank, shuffle=True, seed=self.config.seed)
        sampler.set_epoch(epoch if self.config.reshuffle else 0)
        return [(epoch, index) for index in sampler]

    def steps_per_epoch(self):
        return len(self.epoch_keys(0)) * self.config.repeat

    def last_step(self):
        """Return the step training stops at: iterations, or max_epochs passes over the scenes."""
        return self.config.iterations or self.config.max_epochs * self.steps_per_epoch()

    def scenes(self, start_step):
        """Yield (epoch, scene) of every step from start_step on, each scene `repeat` times in a row."""
        repeat = self.config.repeat
        epoch, position = divmod(start_step, self.steps_per_epoch())
        first, skip = divmod(position, repeat)
        while True:
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=None, sampler=self.epoch_keys(epoch)[first:],
                num_workers=self.config.num_workers, worker_init_fn=ignore_stop_signals,
                generator=torch.Generator().manual_seed(self.config.seed))  # leaves the global RNG alone
            for scene in loader:
                for _ in range(skip, repeat):
                    yield epoch, scene
                skip = 0
            epoch, first = epoch + 1, 0

    # -- training -----------------------------------------------------------------------------

    def train(self):
        """Train from the current step to the last step, or until SIGINT/SIGTERM; return the step reached.

        A signal ends the run after the step in progress, with the latest checkpoint saved. A loss that
        is not finite ends it with a UserError, before anything is logged or saved after it.
        """
        config, last, names = self.config, self.last_step(), self.objective.loss_names
        if self.step >= last:
            if self.rank.is_main:
                print(f"nothing to train: {self.exp_dir} is at step {self.step} and the run ends at step {last}; "
                      f"raise iterations (or max_epochs) to train further", file=sys.stderr)
            return self.step
        if self.rank.is_main:
            print(f"training the {config.stage} stage from step {self.step} to {last}; checkpoints and logs go to "
                  f"{self.exp_dir}", file=sys.stderr)
        bar = progress_bar(last, config.stage, initial=self.step, enabled=self.rank.is_main)
        sums, count = torch.zeros(len(names), device=self.device), 0
        stream = self.scenes(self.step)
        stop = StopRequest()
        try:
            while self.step < last:
                if stop.agreed(self.rank):
                    self.save("latest")
                    if self.rank.is_main:
                        tqdm.write(f"stopped by {stop.signal_name} at step {self.step}: its checkpoint is saved in "
                                   f"{self.exp_dir}; the same command resumes from it")
                    break
                epoch, scene = next(stream)
                batch = self.objective.batch(scene)
                losses = train_step(self.ddp, self.objective, batch, config.precision, self.device)
                self.finite &= torch.isfinite(losses["total"])  # checked when logging or saving: no sync per step
                self.last_losses = losses
                self.step += 1
                bar.update(1)
                sums += torch.stack([losses[name].float() for name in names])
                count += 1
                if self.step % config.log_itr == 0 or self.step == last:
                    self.check_finite()
                    self.log(sums / count, epoch, bar)
                    sums, count = torch.zeros_like(sums), 0
                if config.vis_itr and self.step % config.vis_itr == 0 and self.rank.is_main:
                    self.visualize(scene)
                if self.step % config.save_itr == 0 or self.step == last:
                    self.save("latest")
                if config.archive_itr and self.step % config.archive_itr == 0:
                    self.save(f"{self.step:06d}")
        finally:
            stop.restore()
            stream.close()
            bar.close()
            if self.writer is not None:
                self.writer.close()
        if self.rank.is_main and self.step == last:
            files = ", ".join(str(path) for path in self.checkpoint_files("latest").values())
            print(f"step {self.step}: the checkpoint is {files}")
        return self.step

    def check_finite(self):
        """Raise UserError, on every rank, if a rank's loss was NaN or infinite since the last check (collective)."""
        flag = self.finite.float()
        if self.rank.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item():
            self.checked_step = self.step
            return
        kept = (f"{self.exp_dir}'s checkpoint of step {self.saved_step} is kept" if self.saved_step is not None
                else "no checkpoint was written")
        raise UserError(f"training diverged: the loss became NaN or infinite between steps {self.checked_step + 1} "
                        f"and {self.step}; nothing was saved after it ({kept}); lower lr (now {self.config.lr:g}, "
                        f"e.g. lr={self.config.lr / 10:g}) or use precision=fp32, then rerun")

    def log(self, means, epoch, bar):
        """Average the interval's mean losses over ranks; rank 0 shows and records them."""
        if self.rank.world_size > 1:
            dist.all_reduce(means)
            means /= self.rank.world_size
        if not self.rank.is_main:
            return
        values = dict(zip(self.objective.loss_names, means.tolist()))
        lr = self.objective.schedulers[0].get_last_lr()[0]
        bar.set_description(f"epoch={epoch} lr={lr:1.2e} loss={values['total']:.4f}")
        self.loss_log.append({"step": self.step, "lr": lr, **values})
        for name, value in values.items():
            if self.writer is not None:
                self.writer.add_scalar(f"loss/{name}", value, self.step)
        if self.writer is not None:
            self.writer.add_scalar("lr", lr, self.step)

    @torch.no_grad()
    def visualize(self, scene):
        """Write log/train_{step:06d}.jpg (the objective's picture of the scene) and log/_loss.png.

        The picture's draws run on a forked random state, so visualising changes no training draw.
        """
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            image = self.objective.visualize(scene)
        write_image(image, self.exp_dir / "log" / f"train_{self.step:06d}.jpg")
        rows = self.loss_log.read()
        if rows:
            curves = {name: [row[name] for row in rows] for name in self.objective.loss_names}
            plot_losses(curves, self.exp_dir / "log" / "_loss.png", x=[row["step"] for row in rows], xlabel="step",
                        log_scale=True, title=f"{self.config.stage} stage: mean loss per {self.config.log_itr} steps")
        if self.writer is not None:
            self.writer.add_image("visualisation", image, self.step, dataformats="HWC")

    # -- checkpoints --------------------------------------------------------------------------

    def checkpoint_files(self, name):
        return self.objective.checkpoint_files(self.exp_dir, name)

    def finish_interrupted_saves(self):
        """Complete a checkpoint save that a kill interrupted after its commit point, saying so (rank 0)."""
        for files in finish_interrupted_commits(self.exp_dir):
            print(f"completed the save of {', '.join(str(path) for path in files)} that a kill interrupted",
                  file=sys.stderr)

    def resumable(self):
        """Return whether exp_dir holds the stage's latest checkpoint; UserError if only part of it is there."""
        files = self.checkpoint_files("latest")
        present = [path for path in files.values() if path.is_file()]
        if present and len(present) < len(files):
            missing = [path for path in files.values() if not path.is_file()]
            raise UserError(f"{self.exp_dir} holds {', '.join(map(str, present))} but not "
                            f"{', '.join(map(str, missing))}: a checkpoint is its files together; "
                            f"{self.repair_hint(missing)}")
        return bool(present)

    def repair_hint(self, wrong):
        """Return what can repair a latest checkpoint whose files `wrong` are missing or from another step."""
        pending = [pending_path(path) for path in wrong if pending_path(path).is_file()]
        if pending:
            return (f"{', '.join(map(str, pending))} holds the unfinished save of the other part: rename it over "
                    f"{', '.join(path.name for path in wrong)} if its step matches, or move the files away to start afresh")
        archived = self.archived_steps()
        if archived:
            return (f"copy a complete archived set over them (ckpt_{{step}}* of steps {archived}), "
                    f"or move the files away to start afresh")
        return "there is no archived set to restore; move the files away to start afresh"

    def archived_steps(self):
        """Return the steps whose archived checkpoint files (ckpt_{step:06d}*) are all in exp_dir."""
        steps = sorted({int(match.group(1)) for path in self.exp_dir.glob("ckpt_*.pt")
                        if (match := re.match(r"ckpt_(\d{6})", path.name))})
        return [step for step in steps
                if all(path.is_file() for path in self.checkpoint_files(f"{step:06d}").values())]

    def apply_schedule_changes(self, stored):
        """Give the optimizers the config's learning-rate schedule where it differs from the run's, saying so."""
        changes = schedule_changes(stored, self.config)
        if not changes:
            return
        for optimizer, scheduler in zip(self.objective.optimizers, self.objective.schedulers):
            apply_schedule(optimizer, scheduler, self.config)
        if self.rank.is_main:
            print(f"resuming with {', '.join(changes)}", file=sys.stderr)

    def gathered_rng_states(self):
        """Return every rank's random state, in rank order (collective: all ranks call it)."""
        state = rng_state(self.device)
        if self.rank.world_size == 1:
            return [state]
        states = [None] * self.rank.world_size
        dist.all_gather_object(states, state)
        return states

    def save(self, name):
        """Write the checkpoint files of a name on rank 0, never of non-finite weights (collective: all ranks call it)."""
        self.check_finite()
        states = self.gathered_rng_states()
        if name == "latest":
            self.saved_step = self.step
        if not self.rank.is_main:
            return
        contents = self.objective.checkpoints(self.step)
        first = next(iter(contents))
        contents[first].update(train_config=config_to_dict(self.config), rng_state=states)
        files = self.checkpoint_files(name)
        save_together({files[role]: content for role, content in contents.items()})

    def resume(self):
        """Load weights, optimizers, schedulers, step and random state from exp_dir's latest checkpoint."""
        files = self.checkpoint_files("latest")
        contents = {role: load_file(path, f"{role.upper()} checkpoint to resume from",
                                    where_to_get="a checkpoint written by train.py") for role, path in files.items()}
        for role, ckpt in contents.items():
            missing = [key for key in TRAINING_KEYS if key not in ckpt]
            if missing:
                raise UserError(f"{files[role]} lacks {missing}, so training cannot resume from it; move it out of "
                                f"{self.exp_dir} to start afresh (use init_eft / init_vldm / init_vae to start from weights)")
        steps = {role: int(ckpt["step"]) for role, ckpt in contents.items()}
        if len(set(steps.values())) > 1:
            raise UserError(f"the checkpoint files in {self.exp_dir} are at different steps {steps}; "
                            f"{self.repair_hint(list(files.values()))}")
        first = next(iter(contents.values()))
        conflicts = resume_conflicts(first.get("train_config"), self.config)
        if conflicts:
            raise UserError(f"{self.exp_dir} holds a run trained with other settings: {'; '.join(conflicts)}; "
                            f"a resumed run keeps them: pass the run's values (see its config.yaml) or choose a new "
                            f"exp_dir")
        self.objective.load(contents, files)
        self.apply_schedule_changes(first.get("train_config"))
        self.step = self.saved_step = int(first["step"])
        states = first.get("rng_state") or []
        if len(states) == self.rank.world_size:
            set_rng_state(states[self.rank.rank], self.device)
        else:
            warnings.warn(f"{next(iter(files.values()))} holds the random state of {len(states)} ranks, not "
                          f"{self.rank.world_size}; reseeding from seed + rank + step", stacklevel=2)
            seed_rank(self.config.seed + self.step, self.rank.rank)
        if self.rank.is_main:
            print(f"resuming from {self.exp_dir} at step {self.step}")


def train_worker(rank, config):
    """Train on one rank (the function launch() runs in every process)."""
    Trainer(config, rank).train()


def run_training(config):
    """Check inputs, data and exp_dir, then train in config.gpus local processes (or in the torchrun processes)."""
    if not under_torchrun():
        check_gpu_count(config.gpus)
    preflight(config)
    backend = None if config.backend == "auto" else config.backend
    launch(train_worker, config.gpus, config.port, backend=backend, args=(config,))
