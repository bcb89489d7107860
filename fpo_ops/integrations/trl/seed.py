"""What `FusedDPOTrainer` adds for the seed losses: SPO's regulariser on policy samples and SPPO's win rates.

SPO (Sharifnassab et al., "Soft Preference Optimization: Aligning Language Models to Expert
Distributions", arXiv 2405.00747) regularises with the KL to the reference over the model's whole
output distribution, estimated on sequences sampled from the current policy, and contrasts this
with regularising on the preference data. With ``spo_regularizer="on_policy"`` (the default) the
trainer samples completions of the batch's prompts from the policy every ``spo_sample_every``
optimizer steps (``generate`` on the unwrapped model) and adds β times their summed token-level
KL(π_θ‖π_ref) over the vocabulary, computed by the fused head pass (no logits); the samples of the
last generation are reused, with the current weights, until the next one. By the chain rule of KL,
``E_{y~π_θ}[Σ_t KL(π_θ(·|x, y_<t) ‖ π_ref(·|x, y_<t))]`` is the KL between the two models' whole
distributions over completions, so the sample mean estimates exactly the paper's global term. ``spo_regularizer="pair"``
is the local variant: the KL along the preference pair itself.

Gradient of the regulariser: by default the per-token distribution term only, i.e. the samples
are held fixed and ``Σ_t ∇_θ KL(π_θ(·|x, y_<t) ‖ π_ref(·|x, y_<t))`` is taken at the sampled
prefixes. ``spo_score_function=True`` adds the score-function (REINFORCE) term
``Σ_t ∇ log π_θ(y_t|x, y_<t) · Σ_{t'>t} KL_t'``, which makes the estimate unbiased for
``∇_θ E_{y~π_θ}[Σ_t KL_t]`` when the samples come from the current policy at temperature 1 (fresh
samples, ``spo_sample_every=1``, ``spo_sampling="sample"``); with reused or greedy samples it is
not (see `fpo_ops.losses.token_level.spo_sample_terms`).

SPPO (Wu et al., "Self-Play Preference Optimization for Language Model Alignment", 2024) trains
on pairs with soft win rates; the dataset carries them in the official code's columns
(uclaml/SPPO ``scripts/compute_prob.py``):

* ``chosen_probs_win``: win rate of the chosen response against the K policy samples of its prompt,
  ``(1/K) Σ_k P(y_w ≻ y_k)`` (PairRM); ``chosen_probs_lose``: the same for the rejected response.
  Read by ``sppo``.
* ``chosen_probs``: ``P(y_w ≻ y_l)``, the pair's own preference probability. Read by ``sppo_single``.
* ``spo_weight`` (optional): a per-pair weight μ of SPO's preference term.

These columns survive TRL's dataset processing and are collated into ``[B]`` float tensors.
"""
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from trl.models.utils import unwrap_model_for_generation

from ...losses.registry import LOSSES, users_of
from .common import completion_labels

# Per-pair dataset columns (names of the official SPPO code) and the preference_loss argument each feeds.
PAIR_COLUMNS = ("chosen_probs", "chosen_probs_win", "chosen_probs_lose", "spo_weight")
_COLUMN_ARGUMENTS = {"chosen_probs_win": "chosen_win_prob", "chosen_probs_lose": "rejected_win_prob",
                     "chosen_probs": "pair_win_prob", "spo_weight": "spo_weight"}
_ARGUMENT_COLUMNS = {argument: column for column, argument in _COLUMN_ARGUMENTS.items()}
# Columns each loss type requires (from the registry's required per-pair inputs); the rest are optional.
_REQUIRED_COLUMNS = {name: tuple(_ARGUMENT_COLUMNS[argument] for argument in spec.requires)
                     for name, spec in LOSSES.items() if spec.requires}


@dataclass
class SeedLossArguments:
    r"""Options of the seed losses in `FusedDPOConfig` (SPO's on-policy regulariser).

    Parameters:
        spo_regularizer (`str`, defaults to `"on_policy"`): where SPO's KL(π_θ‖π_ref) is taken:
            ``"on_policy"`` on completions sampled from the policy (the paper's global regulariser) or
            ``"pair"`` on the preference pair (the local variant).
        spo_sample_every (`int`, defaults to `1`): generate new samples every k optimizer steps; in
            between the last ones are reused.
        spo_num_samples (`int` or `None`, defaults to `None`): sequences per generation, over the batch's
            prompts in turn; None: one per pair.
        spo_max_new_tokens (`int`, defaults to `32`): length limit of a sample (it also ends at EOS).
        spo_sampling (`str`, defaults to `"sample"`): ``"sample"`` (ancestral sampling at
            ``spo_temperature``, no top-k/top-p, seeded by torch's generator) or ``"greedy"``.
        spo_temperature (`float`, defaults to `1.0`): sampling temperature (1 samples π_θ itself).
        spo_score_function (`bool`, defaults to `False`): add the score-function term to the
            regulariser's gradient.
    """

    spo_regularizer: str = field(default="on_policy", metadata={"help": "'on_policy' (policy samples) or 'pair'."})
    spo_sample_every: int = field(default=1, metadata={"help": "Generate SPO's samples every k optimizer steps."})
    spo_num_samples: Optional[int] = field(default=None, metadata={"help": "Samples per generation (None: B)."})
    spo_max_new_tokens: int = field(default=32, metadata={"help": "Maximum length of an SPO sample."})
    spo_sampling: str = field(default="sample", metadata={"help": "'sample' or 'greedy' generation of SPO's samples."})
    spo_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of SPO's samples."})
    spo_score_function: bool = field(
        default=False, metadata={"help": "Add the score-function term to the gradient of SPO's regulariser."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.spo_regularizer not in ("on_policy", "pair"):
            raise ValueError(f"spo_regularizer: expected 'on_policy' or 'pair', got {self.spo_regularizer!r}")
        if self.spo_sampling not in ("sample", "greedy"):
            raise ValueError(f"spo_sampling: expected 'sample' or 'greedy', got {self.spo_sampling!r}")
        for name in ("spo_sample_every", "spo_max_new_tokens") + (("spo_num_samples",) if self.spo_num_samples
                                                                  is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if not (isinstance(self.spo_temperature, (int, float)) and self.spo_temperature > 0):
            raise ValueError(f"spo_temperature: expected a float > 0, got {self.spo_temperature!r}")
        if not isinstance(self.spo_score_function, bool):
            raise TypeError(f"spo_score_function: expected a bool, got {type(self.spo_score_function).__name__}")
        if self.spo_score_function and self.spo_regularizer != "on_policy":
            raise ValueError(
                "spo_score_function: the score-function term needs policy samples: expected "
                f"spo_regularizer='on_policy', got {self.spo_regularizer!r}"
            )


def _seed_option(args, name: str):
    """A `SeedLossArguments` option of ``args``, or its default for a plain `trl.DPOConfig`."""
    if hasattr(args, name):
        return getattr(args, name)
    return next(f.default for f in fields(SeedLossArguments) if f.name == name)


class _WithPairColumns:
    """Wraps a preference collator: also collates the per-pair columns present in the examples."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, Any]:
        batch = self.collator(examples)
        for name in PAIR_COLUMNS:
            if name in examples[0]:
                batch[name] = torch.tensor([float(example[name]) for example in examples], dtype=torch.float32)
        return batch


@dataclass
class _Samples:
    """Policy samples of SPO's regulariser, right-padded like the preference batch."""

    step: int
    input_ids: torch.Tensor       # [S, L] prompt then sampled tokens, then padding
    attention_mask: torch.Tensor  # [S, L]
    labels: torch.Tensor          # [S, L - 1] the sampled tokens (through EOS), -100 elsewhere


class SeedLossesMixin:
    """SPO's on-policy regulariser and SPPO's win-rate columns for `FusedDPOTrainer` (see the module)."""

    def _setup_seed_losses(self) -> None:
        self.data_collator = _WithPairColumns(self.data_collator)
        self._spo_samples: Optional[_Samples] = None
        self._spo_generations = 0
        self._spo_on_policy = "spo" in self.loss_types and _seed_option(self.args, "spo_regularizer") == "on_policy"
        if self._spo_on_policy and getattr(self.args, "padding_free", False):
            raise ValueError(
                "spo_regularizer: 'on_policy' appends the samples to the batch's padded rows; expected "
                "padding_free=False or spo_regularizer='pair', got padding_free=True"
            )
        for name, dataset in (("train_dataset", self.train_dataset), ("eval_dataset", self.eval_dataset)):
            datasets = dataset.values() if isinstance(dataset, dict) else [dataset]
            for data in datasets:
                columns = getattr(data, "column_names", None)
                if columns is not None:
                    self._check_pair_columns(name, columns)

    def _check_pair_columns(self, name: str, columns: Sequence[str]) -> None:
        for loss_type, required in _REQUIRED_COLUMNS.items():
            missing = [c for c in required if c not in columns]
            if loss_type in self.loss_types and missing:
                raise ValueError(
                    f"{name}: loss type {loss_type!r} reads the per-pair columns {list(required)} (SPPO's win "
                    f"rates, named as in the official code), missing {missing}; got columns {list(columns)}"
                )

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # without this, `remove_unused_columns` drops the win-rate columns before collation
        self._signature_columns = list(self._signature_columns) + [
            c for c in PAIR_COLUMNS if c not in self._signature_columns
        ]

    def _seed_loss_inputs(self, inputs: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
        """Extra `preference_loss` arguments of this batch's per-pair columns."""
        extra: Dict[str, Any] = {}
        if set(self.loss_types) & set(_REQUIRED_COLUMNS):
            self._check_pair_columns("inputs", list(inputs))
        for column, argument in _COLUMN_ARGUMENTS.items():
            if column in inputs and set(users_of(argument)) & set(self.loss_types):
                extra[argument] = inputs[column].to(device, torch.float32)
        return extra

    # ----------------------------------------------------------------------------------------------
    # SPO's samples
    # ----------------------------------------------------------------------------------------------
    def _spo_step_samples(self, model, inputs: Dict[str, Any]) -> Optional[_Samples]:
        """The policy samples of this step (None without SPO's on-policy regulariser), generated
        before the step's forward: generation is a forward of the policy without gradients, and
        FSDP2 reshards after it."""
        if not self._spo_on_policy:
            return None
        samples = self._spo_samples
        step = self.state.global_step
        if not self.model.training:
            return self._generate_spo_samples(model, inputs, step)  # evaluation: fresh, not cached
        if samples is None or (step != samples.step and step % _seed_option(self.args, "spo_sample_every") == 0):
            samples = self._spo_samples = self._generate_spo_samples(model, inputs, step)
        return samples

    def _spo_joint_kwargs(self, model_kwargs: Dict[str, Any], samples: _Samples) -> Dict[str, Any]:
        """``model_kwargs`` with the sample rows appended, both right-padded to one width.

        The samples run in the batch's own forward: the policy runs one forward with gradients per
        step, where a second one before backward would leave FSDP2 resharding the root's parameters
        in the first one's backward (and would gather ZeRO-3's layers twice).
        """
        tensors = sorted(k for k, v in model_kwargs.items() if isinstance(v, torch.Tensor))
        if tensors != ["attention_mask", "input_ids"]:
            raise ValueError(
                f"spo_regularizer: 'on_policy' appends the samples to the batch's input_ids and attention_mask "
                f"and takes no other model input; got the batch's {tensors}; expected spo_regularizer='pair' "
                f"for such a batch"
            )
        width = max(model_kwargs["input_ids"].shape[1], samples.input_ids.shape[1])
        pad = lambda t, value: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)
        pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else 0  # masked out
        return dict(
            model_kwargs,
            input_ids=torch.cat([pad(model_kwargs["input_ids"], pad_id), pad(samples.input_ids, pad_id)]),
            attention_mask=torch.cat([pad(model_kwargs["attention_mask"], 0), pad(samples.attention_mask, 0)]),
        )

    def _split_spo_rows(self, samples: _Samples, hidden: torch.Tensor, ref_hidden: torch.Tensor, rows: int,
                        length: int) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
        """The joint forward's [2B + S, W - 1, H] hidden states split into the batch's ``rows`` (2B:
        chosen and rejected, cut to its ``length``) and SPO's `preference_loss` arguments of the
        sample rows."""
        sample_length = samples.input_ids.shape[1] - 1
        extra = dict(
            sample_hidden=hidden[rows:, :sample_length], sample_ref_hidden=ref_hidden[rows:, :sample_length],
            sample_labels=samples.labels, spo_score_function=_seed_option(self.args, "spo_score_function"),
        )
        return hidden[:rows, :length - 1], ref_hidden[:rows, :length - 1], extra

    def _generate_spo_samples(self, model, inputs: Dict[str, Any], step: int) -> _Samples:
        """Completions of the chosen rows' prompts, sampled from the policy (no gradient)."""
        n_pairs = inputs["input_ids"].shape[0] // 2
        ids, attention, completion = (inputs[k][:n_pairs] for k in ("input_ids", "attention_mask", "completion_mask"))
        prompt_lengths = (attention.bool() & ~completion.bool()).sum(dim=1).tolist()
        count = _seed_option(self.args, "spo_num_samples") or n_pairs
        prompts = [ids[i % n_pairs, :prompt_lengths[i % n_pairs]] for i in range(count)]
        width = max(len(p) for p in prompts)
        pad_id, eos_id = self._tokenizer.pad_token_id, self._tokenizer.eos_token_id
        left = torch.full((count, width), pad_id, dtype=ids.dtype, device=ids.device)
        left_mask = torch.zeros((count, width), dtype=attention.dtype, device=ids.device)
        for i, prompt in enumerate(prompts):
            left[i, width - len(prompt):] = prompt
            left_mask[i, width - len(prompt):] = 1
        sampling = dict(do_sample=False)
        if _seed_option(self.args, "spo_sampling") == "sample":
            # ancestral sampling from π_θ itself: no top-k / top-p truncation from the generation config
            sampling = dict(do_sample=True, temperature=float(_seed_option(self.args, "spo_temperature")),
                            top_k=0, top_p=1.0)
        with torch.no_grad(), unwrap_model_for_generation(
            model, self.accelerator, gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
        ) as unwrapped:
            generated = unwrapped.generate(
                input_ids=left, attention_mask=left_mask, pad_token_id=pad_id, eos_token_id=eos_id, use_cache=True,
                max_new_tokens=_seed_option(self.args, "spo_max_new_tokens"), **sampling,
            )[:, width:]
        self._spo_generations += 1
        # a sample ends at its first EOS (kept); later tokens are padding of finished sequences
        is_eos = generated == eos_id
        keep = (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0
        rows = [torch.cat([prompt, generated[i][keep[i]]]) for i, prompt in enumerate(prompts)]
        length = max(len(r) for r in rows)
        input_ids = torch.full((count, length), pad_id, dtype=ids.dtype, device=ids.device)
        attention_mask = torch.zeros((count, length), dtype=attention.dtype, device=ids.device)
        sampled = torch.zeros((count, length), dtype=torch.bool, device=ids.device)
        for i, (row, prompt) in enumerate(zip(rows, prompts)):
            input_ids[i, :len(row)] = row
            attention_mask[i, :len(row)] = 1
            sampled[i, len(prompt):len(row)] = True
        labels = completion_labels(input_ids, sampled)
        return _Samples(step, input_ids, attention_mask, labels)
