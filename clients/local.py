"""One client's local training: its data for the current task, the objective, the continual method.

Plain functions over a `LocalContext`, testable without Flower; `clients.app` only adapts messages.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn

from clients.oversampling import is_flat, smote, smote_features
from clients.semisup import PLAIN, PSEUDO_LABELS, PseudoLabelCounts, UnlabeledStep, View
from clients.terms import LossTerm, Step
from fedtail.models import array_from_numpy, array_to_numpy, on_device
from fedtail.partition import load_client
from fedtail.protocol import Job
from fedtail.registry import CONTINUAL, OBJECTIVES, SEMISUP, STRATEGIES
from fedtail.staging import load_staged

if TYPE_CHECKING:
    from fedtail.config import FedtailConfig


@dataclass
class LocalContext:
    """What a local objective or continual method may look at during one round of local training."""

    job: Job
    partition_id: int
    task: int
    global_round: int
    task_classes: list[int]
    seen_classes: list[int]
    class_prior: np.ndarray
    class_counts: np.ndarray
    model: nn.Module
    global_model_fn: Callable[[], nn.Module]
    """Builds the frozen copy of the received global model; called on first use of `global_model`."""
    state: RecordDict
    device: torch.device
    options: dict[str, Any] = field(default_factory=dict)
    global_counts: np.ndarray | None = None
    """Per-class training counts summed over all clients (what the server derived the prior from)."""
    train_counts: np.ndarray | None = None
    """Per-class counts of this round's training labels (after the continual method's replay); set by
    `train_local` before the objective is built."""
    data: ClientData | None = None
    """All of this client's training samples, every task's (replay memories and Joint select from it)."""
    held_classes: list[int] | None = None
    """Classes of the tasks this client took part in so far (per-client arrival); None: every seen class.
    A client absent from a task never received that task's data, so its memory may not hold it."""
    sample_index: np.ndarray | None = None
    """Positions in `data` of the round's samples (``x`` of `train_local`): DER++'s buffer keeps them."""
    unlabeled_index: np.ndarray | None = None
    """Positions in ``data.x_unlabeled`` of the round's unlabeled samples (this task's); None when the
    semi-supervised method draws no unlabeled stream."""
    previous_model_fn: Callable[[], nn.Module] | None = None
    """Builds the global model as it was at the end of the previous task; the server sends it only to
    continual methods that declare `ContinualMethod.uses_previous_model`, and only after task 0."""
    previous_head: dict[str, np.ndarray] | None = None
    """The continual method's head as of the end of the previous task (`ContinualMethod.statistics_rounds`
    methods; sent beside the previous model), e.g. BiC's bias layer of the teacher."""
    message: RecordDict = field(default_factory=RecordDict)
    """The train message's content: its config record and the strategy's records (`train_records`)."""
    reply: dict[str, Any] = field(default_factory=dict)
    """Records the strategy's client part adds to the train reply (control variates, statistics)."""

    def received(self, classes: Sequence[int]) -> list[int]:
        """Those of ``classes`` whose data this client received (`held_classes`)."""
        if self.held_classes is None:
            return list(classes)
        held = set(self.held_classes)
        return [c for c in classes if c in held]

    @functools.cached_property
    def global_model(self) -> nn.Module:
        """The received global model, frozen (eval mode, no gradients). Built on first use, so only the
        objectives and continual methods that look at it (proximal terms, distillation) pay for it."""
        return frozen(self.global_model_fn().to(self.device))

    @functools.cached_property
    def previous_model(self) -> nn.Module:
        """The global model at the end of the previous task, frozen: distillation's teacher, EWC's
        anchor, herding's feature extractor. Built on first use."""
        if self.previous_model_fn is None:
            raise RuntimeError(
                "no end-of-task model in this train message: the continual method must set "
                "uses_previous_model = True (the server sends it from task 1 on)"
            )
        return frozen(self.previous_model_fn().to(self.device))


def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass(frozen=True)
class ClientData:
    """A client's training samples (all tasks): labeled part and unlabeled part."""

    x: np.ndarray
    y: np.ndarray
    x_unlabeled: np.ndarray
    index: np.ndarray | None = None
    """Positions of the labeled samples in the staged training set (per-sample draws: blurry tasks)."""
    y_hidden: np.ndarray | None = None
    """The unlabeled samples' true labels: never a training target (but for the all-labels upper bound);
    they pick a task's unlabeled samples, as a data stream would deliver them, and score pseudo-labels."""
    index_unlabeled: np.ndarray | None = None
    """Positions of the unlabeled samples in the staged training set."""

    @property
    def nbytes(self) -> int:
        extra = sum(a.nbytes for a in (self.y_hidden, self.index_unlabeled) if a is not None)
        return self.x.nbytes + self.y.nbytes + self.x_unlabeled.nbytes + extra

    def unlabeled(self) -> ClientData:
        """The unlabeled part seen as labeled by its hidden labels (to select a task's samples alike)."""
        y = self.y_hidden if self.y_hidden is not None else np.zeros(0, dtype=np.int64)
        return ClientData(
            x=self.x_unlabeled, y=y, x_unlabeled=self.x_unlabeled[:0], index=self.index_unlabeled
        )

    @property
    def sample_bytes(self) -> int:
        """Bytes of one input sample (what a memory keeping it holds, besides its label)."""
        return int(self.x.itemsize * np.prod(self.x.shape[1:], dtype=np.int64))

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.y, minlength=num_classes).astype(np.int64)

    def positions(self, classes: Sequence[int]) -> np.ndarray:
        """Positions of the samples of ``classes``, in data order."""
        table = np.zeros(max(int(self.y.max(initial=0)), max(classes, default=0)) + 1, dtype=bool)
        table[list(classes)] = True  # labels are small ints: a lookup table beats np.isin's set-up
        return np.flatnonzero(table[self.y])

    def for_classes(self, classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        index = self.positions(classes)
        return self.x[index], self.y[index]


CLIENT_CACHE_BYTES = 256 * 2**20


class _ClientCache:
    """Least-recently-used clients' data, bounded by bytes rather than by clients: a count bound (64)
    missed on every call once a federation had more clients than that, while 1,000 digits clients hold
    a few MB in all."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple, ClientData] = OrderedDict()
        self._lock = threading.Lock()  # an abandoned (timed-out) call's thread may still load

    def get(self, key: tuple, load: Callable[[], ClientData]) -> ClientData:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        data = load()
        with self._lock:
            if key not in self._items and data.nbytes <= self.max_bytes:
                self._items[key] = data
                self.bytes += data.nbytes
                while self.bytes > self.max_bytes:
                    self.bytes -= self._items.popitem(last=False)[1].nbytes
        return data


_CLIENTS = _ClientCache(CLIENT_CACHE_BYTES)


def load_client_data(
    staged_dir: str, partition_dir: str, partition_id: int, reveal: bool = False
) -> ClientData:
    """Read (and cache per process, up to `CLIENT_CACHE_BYTES`) one client's samples from the staged
    arrays and its partition; ``reveal``: every sample labeled (the all-labels upper bound).

    A miss costs O(the client's samples): the staged arrays stay memory-mapped and the partition indexed
    per process (`load_staged`, `fedtail.partition.partition_index`)."""

    def load() -> ClientData:
        splits = load_staged(Path(staged_dir))
        idx, labeled = load_client(Path(partition_dir), partition_id)
        if reveal:
            labeled = np.ones_like(labeled)
        x = np.asarray(splits.x_train[idx], dtype=np.float32)
        y = np.asarray(splits.y_train[idx], dtype=np.int64)
        return ClientData(
            x=x[labeled],
            y=y[labeled],
            x_unlabeled=x[~labeled],
            index=idx[labeled],
            y_hidden=y[~labeled],
            index_unlabeled=idx[~labeled],
        )

    return _CLIENTS.get((staged_dir, partition_dir, partition_id, reveal), load)


def step_seed(seed: int, *keys: int) -> int:
    """Independent, reproducible seed for (run seed, task, round, client): same on every engine."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def make_optimizer(model: nn.Module, job: Job, lr: float | None = None) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``model``'s parameters, at ``lr`` (default ``train.lr``)."""
    t = job.config.train
    lr = t.lr if lr is None else lr
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=t.weight_decay)


OPTIMIZER_KEY = "optimizer"
OPTIMIZER_TASK_KEY = "optimizer-task"


def restore_optimizer_state(optimizer: torch.optim.Optimizer, ctx: LocalContext) -> None:
    """Load the per-parameter state this client's optimiser had at the end of its last round of the
    current task (`train.keep_optimizer_state`); the learning rate stays this round's. Nothing is loaded
    at a task's first round, or for another optimiser than the one that saved it."""
    meta = ctx.state.get(OPTIMIZER_TASK_KEY)
    kind = ctx.job.config.train.optimizer
    if meta is None or int(meta["task"]) != ctx.task or meta["optimizer"] != kind:
        return
    record = ctx.state[OPTIMIZER_KEY]
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, array in record.items():
        index, name = key.split("/", 1)
        per_param.setdefault(int(index), {})[name] = torch.from_numpy(array_to_numpy(array).copy())
    optimizer.load_state_dict({"state": per_param, "param_groups": optimizer.state_dict()["param_groups"]})


def save_optimizer_state(optimizer: torch.optim.Optimizer, ctx: LocalContext) -> None:
    """The optimiser's per-parameter state into the client's state, as ``<param index>/<name>`` arrays
    (checkpointed with the run, so a resumed run continues with the same momentum)."""
    record = ArrayRecord()
    for index, entries in optimizer.state_dict()["state"].items():
        for name, value in entries.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            record[f"{index}/{name}"] = array_from_numpy(tensor.detach().cpu().numpy())
    ctx.state[OPTIMIZER_KEY] = record
    ctx.state[OPTIMIZER_TASK_KEY] = ConfigRecord(
        {"task": ctx.task, "optimizer": ctx.job.config.train.optimizer}
    )


def epoch_order(y: torch.Tensor, sampler: str, generator: torch.Generator) -> torch.Tensor:
    """One epoch's sample order over labels ``y`` (on the CPU).

    ``shuffle``: a permutation. ``class_balanced``: ``len(y)`` draws with replacement, sample i with
    probability ``1 / (C n_{y_i})`` (C classes present), i.e. a class uniformly, then one of its samples
    uniformly: the class-balanced sampling of Kang et al., "Decoupling Representation and Classifier for
    Long-Tailed Recognition" (ICLR 2020), used by cRT; on a client it balances the classes it holds.
    """
    n = int(y.numel())
    if sampler == "shuffle":
        return torch.randperm(n, generator=generator)
    if sampler != "class_balanced":
        raise ValueError(f"train.sampler={sampler!r}; allowed: shuffle, class_balanced")
    _, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse].double()
    return torch.multinomial(weights, n, replacement=True, generator=generator)


HIDDEN_LOGIT = -1e9
"""What the objective sees for a class the continual method hides from it: softmax gives it exactly 0 and
no gradient reaches its logit, whatever shift (log prior, margin) the objective adds."""


def _hidden_classes(classes: list[int] | None, num_classes: int, device: torch.device) -> torch.Tensor | None:
    if classes is None:
        return None
    hidden = torch.ones(num_classes, dtype=torch.bool, device=device)
    hidden[torch.as_tensor(classes, dtype=torch.int64, device=device)] = False
    return hidden


def strategy_terms(ctx: LocalContext) -> list[LossTerm]:
    """The server strategy's client part for this round (none for a server-only strategy)."""
    cfg = ctx.job.config
    strategy = STRATEGIES.get(cfg.strategy.name)
    term = strategy.client_term
    return [] if term is None else [term(ctx, strategy.Options.model_validate(cfg.strategy.options))]


UNLABELED_STREAM, AUGMENT_STREAM = 0x55, 0xA6  # keys of the unlabeled order's and the views' seeds


@functools.lru_cache(maxsize=16)
def _augmentation(dataset: str, name: str, options_json: str) -> Any:
    """One instance per (dataset, augmentation, options) and process: built once, not every round."""
    from fedtail.registry import AUGMENTATIONS, DATASETS

    return AUGMENTATIONS.get(name)(DATASETS.get(dataset), json.loads(options_json))


def view_augmentation(cfg: FedtailConfig, view: str) -> Any:
    """The augmentation of view ``weak`` / ``strong`` (``semisup.<view>`` with its options), the
    process's one instance (`_augmentation`)."""
    ss = cfg.semisup
    options = json.dumps(getattr(ss, f"{view}_options"), sort_keys=True)
    return _augmentation(cfg.dataset.name, getattr(ss, view), options)


class UnlabeledStream:
    """The round's unlabeled batches: consecutive seeded permutations of the client's unlabeled samples
    (every sample once per pass), ``size`` at a time, and their augmented views, from their own seeds so
    that the labeled stream is the same with or without them."""

    def __init__(self, ctx: LocalContext, seed: int, views: tuple[str, ...]) -> None:
        cfg = ctx.job.config
        ss = cfg.semisup
        index = np.asarray(ctx.unlabeled_index, dtype=np.int64)
        data = ctx.data
        self.index = torch.from_numpy(index)
        self.x = torch.from_numpy(data.x_unlabeled[index]).to(ctx.device)
        hidden = data.y_hidden[index] if data.y_hidden is not None else np.zeros(len(index), dtype=np.int64)
        self.hidden = torch.from_numpy(np.asarray(hidden, dtype=np.int64)).to(ctx.device)
        self.n = len(index)
        self.size = min(ss.mu * cfg.train.batch_size, self.n)
        self._order_gen = torch.Generator().manual_seed(step_seed(seed, UNLABELED_STREAM))
        self._aug_gen = torch.Generator().manual_seed(step_seed(seed, AUGMENT_STREAM))
        self._pending = torch.zeros(0, dtype=torch.int64)
        self._cfg = cfg
        self.augment = {v: view_augmentation(cfg, v) for v in views if v != PLAIN}
        self.views = views

    def steps_per_epoch(self) -> int:
        """Steps of an epoch on a client without labels: one pass over the unlabeled samples."""
        return -(-self.n // self.size) if self.size else 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The next batch: positions in the round's unlabeled samples, their inputs, their views."""
        while len(self._pending) < self.size:
            self._pending = torch.cat([self._pending, torch.randperm(self.n, generator=self._order_gen)])
        pos, self._pending = self._pending[: self.size], self._pending[self.size :]
        xb = self.x[pos.to(self.x.device)]
        return pos, xb, {v: xb if v == PLAIN else self.augment[v](xb, self._aug_gen) for v in self.views}

    def view(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """A further view ``name`` of ``x`` from the views' seeded stream (`UnlabeledStep.augment`)."""
        if name == PLAIN:
            return x
        if name not in self.augment:
            self.augment[name] = view_augmentation(self._cfg, name)
        return self.augment[name](x, self._aug_gen)

    @property
    def generator(self) -> torch.Generator:
        """The views' seeded stream, which a method's own draws (mixup's) continue."""
        return self._aug_gen


def train_local(ctx: LocalContext, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """Run ``train.epochs`` epochs of minibatch training; return (mean loss, FedAvg weight).

    With ``train.oversample: smote`` the round's samples are topped up with SMOTE's: synthetic inputs
    for flat data; for other data synthetic features, which the classifier alone sees (they join each
    batch's logits; the objective's ``x`` and the continual method's terms see the real samples only).
    The objective's local counts are those of the real samples.

    Each step is one forward pass whose features and logits every loss term shares: the labeled batch
    and, for a semi-supervised method, the views of an unlabeled batch (`UnlabeledStream`). The
    strategy's client part adjusts the logits the objective scores and adds its term, beside the
    objective's loss, the continual method's `extra_loss` and the semi-supervised method's unlabeled
    loss (`clients.terms`, `clients.semisup`). The FedAvg weight is the real labeled samples, plus the
    unlabeled ones the method trained on when ``semisup.count_unlabeled``."""
    cfg = ctx.job.config
    method = CONTINUAL.get(cfg.continual.method)(ctx)
    xt, yt = method.training_data(torch.from_numpy(x), torch.from_numpy(y))
    n_real = int(yt.shape[0])  # the update's FedAvg weight: synthetic samples add no data
    seed = step_seed(cfg.seed, ctx.task, ctx.global_round, ctx.partition_id)
    semi_cls = SEMISUP.get(cfg.semisup.method)
    stream = None
    warm = ctx.global_round > cfg.semisup.warmup_rounds  # rounds count from 1
    if semi_cls.views and warm and ctx.unlabeled_index is not None and len(ctx.unlabeled_index):
        stream = UnlabeledStream(ctx, seed, semi_cls.views)
    if n_real == 0 and stream is None:
        return 0.0, 0
    semi = semi_cls(ctx, semi_cls.Options.model_validate(cfg.semisup.options))
    ctx.train_counts = np.bincount(yt.numpy(), minlength=cfg.num_classes).astype(np.int64)
    objective = OBJECTIVES.get(cfg.train.objective)(ctx)
    model = ctx.model if on_device(ctx.model, ctx.device) else ctx.model.to(ctx.device)
    feats = fy = None
    x_real, y_real = xt, yt
    if cfg.train.oversample == "smote" and n_real:
        if is_flat(xt):
            xs, ys = smote(xt.numpy(), yt.numpy(), cfg.train.smote_k, seed)
            xt, yt = torch.from_numpy(xs), torch.from_numpy(ys)
        else:
            feats, fy = smote_features(model, xt.to(ctx.device), yt, cfg.train.smote_k, seed)
    n = int(yt.shape[0])
    labels = yt if feats is None else torch.cat([yt, fy])
    xt, yt = xt.to(ctx.device), yt.to(ctx.device)
    if fy is not None:
        fy = fy.to(ctx.device)
    objective.begin()
    lr = cfg.train.lr * objective.lr_scale() * method.lr_scale()
    optimizer = make_optimizer(model, ctx.job, lr)
    if cfg.train.keep_optimizer_state:
        restore_optimizer_state(optimizer, ctx)
    terms = strategy_terms(ctx)
    for term in terms:
        term.begin(model, lr, x_real, y_real)
    generator = torch.Generator().manual_seed(seed)
    bs = cfg.train.batch_size
    per_epoch = -(-len(labels) // bs) if len(labels) else stream.steps_per_epoch()
    counts = None
    if stream is not None:
        semi.begin(np.asarray(ctx.unlabeled_index))
        counts = PseudoLabelCounts(cfg.num_classes, ctx.device)
    total, steps = 0.0, 0
    shown = method.objective_classes()  # plus any class in the data (blurry tasks bring the next one's)
    shown = None if shown is None else sorted(set(shown) | set(np.unique(labels.numpy()).tolist()))
    hidden = _hidden_classes(shown, cfg.num_classes, ctx.device)
    weight = method.objective_weight() * (semi.labeled_weight() if stream is not None else 1.0)
    clip, params = cfg.train.max_grad_norm, [p for p in model.parameters() if p.requires_grad]
    model.train()
    for _ in range(cfg.train.epochs):
        order = epoch_order(labels, cfg.train.sampler, generator).to(ctx.device) if len(labels) else None
        for k in range(per_epoch):
            batch = order[k * bs : (k + 1) * bs] if order is not None else labels[:0].to(ctx.device)
            views = {}
            if feats is None:
                xb, yb = xt[batch], yt[batch]
            else:  # real samples through the model, synthetic features through the classifier
                real, syn = batch[batch < n], batch[batch >= n] - n
                xb = xt[real]
                yb = torch.cat([yt[real], fy[syn]])
                batch = real
            if stream is None:
                f = model.features(xb)
                logits = model.classifier(f)
            else:
                pos, _, views = stream.next()
                views = {
                    **views,
                    **semi.extra_inputs(xb, yb[: len(xb)], stream.index[pos], views, stream.generator),
                }
                sizes = [len(xb), *(len(v) for v in views.values())]
                f_all = model.features(torch.cat([xb, *views.values()]))
                logits_all = model.classifier(f_all)
                f_parts, l_parts = f_all.split(sizes), logits_all.split(sizes)
                f, logits = f_parts[0], l_parts[0]
                views = {
                    name: View(vx, fv, lv)
                    for name, vx, fv, lv in zip(views, views.values(), f_parts[1:], l_parts[1:], strict=True)
                }
            if feats is not None:
                logits = torch.cat([logits, model.classifier(feats[syn])])
            step = Step(xb, yb, f, logits)
            if len(yb):
                scored = logits
                for term in terms:
                    scored = term.adjust_logits(scored)
                scored = semi.adjust_logits(scored)
                seen_by_objective = scored if hidden is None else scored.masked_fill(hidden, HIDDEN_LOGIT)
                loss = objective.loss(seen_by_objective, yb, xb)
                if weight != 1.0:
                    loss = weight * loss
                extra = method.extra_loss(logits[: len(xb)], yb[: len(xb)], xb)
                if extra is not None:
                    loss = loss + extra
                for term in terms:
                    added = term.loss(step)
                    if added is not None:
                        loss = loss + added
            else:  # a client without labels: the unlabeled term alone
                loss = logits.sum() * 0.0
            if stream is not None:
                unlabeled = semi.loss(
                    UnlabeledStep(
                        step, stream.index[pos], views, steps, per_epoch * cfg.train.epochs, stream.view
                    )
                )
                if unlabeled is not None:
                    loss = loss + unlabeled.loss
                    counts.add(stream.hidden[pos.to(stream.hidden.device)], unlabeled.labels, unlabeled.mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for term in terms:
                term.before_step()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            if len(xb):
                method.after_step(logits[: len(xb)].detach(), yb[: len(xb)], batch)
            total += float(loss.detach())
            steps += 1
    objective.end()
    method.end_round()
    for term in terms:
        term.end(model, steps)
    if stream is not None:
        semi.end(steps)
        ctx.reply[PSEUDO_LABELS] = ArrayRecord(
            {k: array_from_numpy(v) for k, v in counts.as_arrays().items()}
        )
    if cfg.train.keep_optimizer_state:
        save_optimizer_state(optimizer, ctx)
    weight_n = n_real + (stream.n if stream is not None and cfg.semisup.count_unlabeled else 0)
    return total / max(steps, 1), weight_n


def retrain_classifier(ctx: LocalContext, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
    """One cRT round on this client (Kang et al., "Decoupling Representation and Classifier for
    Long-Tailed Recognition", ICLR 2020): the features stay frozen, the classifier is trained with
    cross-entropy on class-balanced batches (`epoch_order`'s ``class_balanced``) for ``crt.epochs``
    epochs at ``crt.lr``. The training samples are the continual method's (`training_data`: a replay
    memory counts); its loss terms belong to representation learning and are not used.

    Frozen features let the embeddings be computed once per round instead of once per step."""
    cfg = ctx.job.config
    method = CONTINUAL.get(cfg.continual.method)(ctx)
    xt, yt = method.training_data(torch.from_numpy(x), torch.from_numpy(y))
    n = int(yt.shape[0])
    if n == 0:
        return 0.0, 0
    model = ctx.model if on_device(ctx.model, ctx.device) else ctx.model.to(ctx.device)
    for p in model.features.parameters():
        p.requires_grad_(False)
    model.features.eval()
    with torch.no_grad():
        feats = torch.cat([model.features(xb) for xb in xt.to(ctx.device).split(4096)])
    labels, yd = yt, yt.to(ctx.device)
    head = model.classifier.train()
    t = cfg.train
    optimizer = make_optimizer(head, ctx.job, cfg.crt.lr)
    seed = step_seed(cfg.seed, ctx.task, ctx.global_round, ctx.partition_id)
    generator = torch.Generator().manual_seed(seed)
    total, steps = 0.0, 0
    for _ in range(cfg.crt.epochs or t.epochs):
        order = epoch_order(labels, "class_balanced", generator).to(ctx.device)
        for start in range(0, n, t.batch_size):
            batch = order[start : start + t.batch_size]
            loss = nn.functional.cross_entropy(head(feats[batch]), yd[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
    return total / max(steps, 1), n
