"""Trains TRL's trainers and the fused drop-ins under the engine of an ``accelerate launch``.

Run by `test_distributed_engines.py` as users run TRL, one launch per engine::

    accelerate launch --config_file examples/accelerate/zero3.yaml --num_processes 2 \
        tests/distributed/engine_training.py OUT CASE [CASE ...]

Every case trains one or more labelled runs ("trl", "fused", ...) from the same seed and data, and
rank 0 saves ``OUT/CASE.pt``: per label the log history, the final weights gathered whole, and what
the test checks of the set-up (the engine really partitioned or sharded the model). A failing run is
recorded with its traceback, and the other cases still run.

On a CPU machine accelerate 1.16 turns ``distributed_type: FSDP`` into plain multi-CPU data
parallelism (it enables FSDP on accelerator devices only); `fsdp_on_cpu` makes the gloo state FSDP as
accelerate makes the GPU one, so that ``prepare`` shards the model with FSDP2's ``fully_shard``.
"""
import copy
import os
import sys
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "support"))

from hf_fixtures import WORDS, preference_dataset, tiny_model, tiny_tokenizer  # noqa: E402
from trainer_fixtures import completion_dataset  # noqa: E402

STEPS = 3
TIMING = ("_runtime", "_samples_per_second", "_steps_per_second", "step_time")
FP32 = dict(
    max_steps=STEPS, learning_rate=1e-2, optim="sgd", logging_steps=1, report_to="none", save_strategy="no",
    seed=7, dataloader_drop_last=True, use_cpu=True, disable_tqdm=True, bf16=False, gradient_checkpointing=False,
    ddp_backend="gloo", per_device_train_batch_size=2,
)
# TRL's default precision: bf16 autocast, gradient checkpointing.
BF16 = {k: v for k, v in FP32.items() if k not in ("bf16", "gradient_checkpointing")}
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"


def build_model(family: str = "llama"):
    """The tiny model of ``family``; the tied one with its shared embedding scaled down: at the
    fixtures' head scale a tied model's logits favour the input token so strongly that generation
    repeats it and every completion of a prompt is the same (no advantage, no gradient)."""
    made = tiny_model(family)
    if family == "llama_tied":
        with torch.no_grad():
            made.get_input_embeddings().weight.mul_(0.2)
    return made


def fsdp_on_cpu() -> None:
    """Let an ``AcceleratorState`` given an FSDP plugin on a multi-CPU (gloo) launch be an FSDP state."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # what accelerate does for the accelerator types (state.py, AcceleratorState.__init__)
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = __init__


def _engine(trainer) -> dict:
    """How the trained model is held: the engine name and whether its LM head is partitioned/sharded."""
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    model = trainer.accelerator.unwrap_model(trainer.model)
    from fpo_ops.integrations.hf import unwrap_peft

    head = unwrap_peft(model).get_output_embeddings().weight
    info = dict(world=trainer.accelerator.num_processes, type=str(state.distributed_type))
    if state.distributed_type == DistributedType.DEEPSPEED:
        info["zero_stage"] = state.deepspeed_plugin.zero_stage
        info["head_partition"] = (tuple(head.ds_tensor.shape), head.ds_numel) if hasattr(head, "ds_id") else None
        offload = state.deepspeed_plugin.deepspeed_config["zero_optimization"].get("offload_param", {})
        info["offload_param"] = offload.get("device")
        info["head_device"] = str(head.ds_tensor.device) if hasattr(head, "ds_id") else str(head.device)
    elif state.distributed_type == DistributedType.FSDP:
        info["fsdp_version"] = state.fsdp_plugin.fsdp_version
        info["head_placements"] = str(getattr(head, "placements", None))
        info["head_local_shape"] = tuple(head.to_local().shape) if hasattr(head, "to_local") else None
    return info


def _full_params(trainer) -> dict:
    """Every parameter of the trained model, whole (ZeRO-3 partitions gathered, DTensors assembled)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = dict(model.named_parameters())
    partitioned = [p for p in params.values() if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            return {n: p.detach().clone() for n, p in params.items()}
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in params.items()}


def _comparable(logged: dict) -> dict:
    return {k: v for k, v in logged.items() if k != "total_flos" and not k.endswith(TIMING)}


def _trained(trainer) -> dict:
    import transformers

    transformers.set_seed(trainer.args.seed)  # seeded in __init__ only: generating trainers sample alike
    trainer.train()
    return dict(logs=[_comparable(row) for row in trainer.state.log_history], params=_full_params(trainer),
                engine=_engine(trainer),
                precision=(trainer.args.bf16, trainer.args.gradient_checkpointing),
                spo_generations=getattr(trainer, "_spo_generations", None))


def _perturbed(model, scale=0.05, seed=3):
    ref = copy.deepcopy(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in ref.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return ref


def _peft(kwargs, peft):
    if peft:
        import peft as peft_lib

        torch.manual_seed(0)  # the adapters' initialisation draws from the global generator
        kwargs["peft_config"] = peft_lib.LoraConfig(**LORA)
    return kwargs


def dpo(fused, out, family="llama", peft=False, precision=FP32, **config):
    from trl import DPOConfig, DPOTrainer

    from fpo_ops.integrations.trl import FusedDPOConfig, FusedDPOTrainer

    trainer_cls, config_cls = (FusedDPOTrainer, FusedDPOConfig) if fused else (DPOTrainer, DPOConfig)
    model = build_model(family)
    # PEFT: the reference is the policy with its adapters disabled, as in TRL
    kwargs = _peft({}, peft) if peft else dict(ref_model=_perturbed(model))
    args = config_cls(output_dir=out, beta=0.3, max_length=None, **{**precision, **config})
    return _trained(trainer_cls(model=model, args=args, train_dataset=preference_dataset(2 * 2 * STEPS),
                                processing_class=tiny_tokenizer(), **kwargs))


def sft(fused, out, family="llama", peft=False, precision=FP32, **config):
    from trl import SFTConfig, SFTTrainer

    from fpo_ops.integrations.trl import FusedSFTConfig, FusedSFTTrainer

    trainer_cls, config_cls = (FusedSFTTrainer, FusedSFTConfig) if fused else (SFTTrainer, SFTConfig)
    args = config_cls(output_dir=out, **{**precision, **config})
    return _trained(trainer_cls(model=build_model(family), args=args, processing_class=tiny_tokenizer(),
                                train_dataset=completion_dataset(2 * 2 * STEPS), **_peft({}, peft)))


def kto(fused, out, family="llama", peft=False, precision=FP32, **config):
    from trl import KTOConfig, KTOTrainer

    from fpo_ops.integrations.trl import FusedKTOConfig, FusedKTOTrainer

    trainer_cls, config_cls = (FusedKTOTrainer, FusedKTOConfig) if fused else (KTOTrainer, KTOConfig)
    model = build_model(family)
    kwargs = _peft({}, peft) if peft else dict(ref_model=_perturbed(model))
    rows = 2 * 4 * STEPS
    # Unpaired feedback: alternately desirable and undesirable, each batch holds both.
    dataset = completion_dataset(rows).add_column("label", [i % 2 == 0 for i in range(rows)])
    args = config_cls(output_dir=out, **{**precision, "per_device_train_batch_size": 4, **config})
    return _trained(trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tiny_tokenizer(),
                                **kwargs))


def reward_length(completions, **kwargs):
    return [float(len(c.split())) for c in completions]


def reward_word_ids(completions, **kwargs):
    return [float(sum(int(w[1:]) for w in c.split() if w[1:].isdigit()) % 7) for c in completions]


def _rl(trainer_cls, config_cls, out, model_path, family, peft, precision, **config):
    args = config_cls(output_dir=out, num_generations=2, max_completion_length=5, temperature=0.9,
                      **{**precision, "per_device_train_batch_size": 4, **config})
    trainer = trainer_cls(model=model_path(family), reward_funcs=[reward_length, reward_word_ids], args=args,
                          train_dataset=completion_dataset(8 * STEPS).remove_columns("completion"),
                          processing_class=tiny_tokenizer(), **_peft({}, peft))
    return _trained(trainer)


def grpo(fused, out, model_path, family="llama", peft=False, precision=FP32, **config):
    from trl import GRPOConfig, GRPOTrainer

    from fpo_ops.integrations.trl import FusedGRPOConfig, FusedGRPOTrainer

    classes = (FusedGRPOTrainer, FusedGRPOConfig) if fused else (GRPOTrainer, GRPOConfig)
    return _rl(*classes, out, model_path, family, peft, precision, **{"beta": 0.04, **config})


def rloo(fused, out, model_path, family="llama", peft=False, precision=FP32, **config):
    from trl import RLOOConfig, RLOOTrainer

    from fpo_ops.integrations.trl import FusedRLOOConfig, FusedRLOOTrainer

    classes = (FusedRLOOTrainer, FusedRLOOConfig) if fused else (RLOOTrainer, RLOOConfig)
    return _rl(*classes, out, model_path, family, peft, precision, **{"beta": 0.04, **config})


def distillation(fused, out, family="llama", peft=False, precision=FP32, **config):
    from trl import DistillationConfig, DistillationTrainer

    from fpo_ops.integrations.trl import FusedDistillationConfig, FusedDistillationTrainer

    trainer_cls, config_cls = ((FusedDistillationTrainer, FusedDistillationConfig) if fused
                               else (DistillationTrainer, DistillationConfig))
    model = build_model(family)
    args = config_cls(output_dir=out, beta=0.5, temperature=0.7, max_completion_length=6,
                      **{**precision, "per_device_train_batch_size": 4, **config})
    return _trained(trainer_cls(model=model, teacher_model=_perturbed(model), args=args,
                                train_dataset=completion_dataset(8 * STEPS).remove_columns("completion"),
                                processing_class=tiny_tokenizer(), **_peft({}, peft)))


def gkd(fused, out, family="llama", peft=False, precision=FP32, **config):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from fpo_ops.integrations.trl_gkd import FusedGKDTrainer

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    g = torch.Generator().manual_seed(0)

    def sentence(low, high):
        n = int(torch.randint(low, high, (1,), generator=g))
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))

    dataset = Dataset.from_list([{"messages": [{"role": "user", "content": sentence(2, 6)},
                                               {"role": "assistant", "content": sentence(2, 8)}]}
                                 for _ in range(8 * STEPS)])
    args = GKDConfig(output_dir=out, lmbda=0.0, seq_kd=False, beta=0.5, max_length=64,
                     **{**precision, "per_device_train_batch_size": 4, **config})
    model = build_model(family)
    return _trained((FusedGKDTrainer if fused else GKDTrainer)(
        model=model, teacher_model=_perturbed(model), args=args, train_dataset=dataset, processing_class=tokenizer,
        **_peft({}, peft)))


TRAINERS = dict(dpo=dpo, sft=sft, kto=kto, grpo=grpo, rloo=rloo, distillation=distillation, gkd=gkd)
RL = ("grpo", "rloo")
# Greedy SPO samples are a function of the prompts and the weights: each rank draws what one process
# draws for its prompts. New samples at steps 0 and 2.
SPO = dict(loss_type="spo", spo_alpha=1.5, spo_sampling="greedy", spo_max_new_tokens=4, spo_sample_every=2)


def cases() -> dict:
    """name -> (trainer, {label: (fused, options)}). Labels "trl"/"fused" are compared with each other."""
    pair = lambda **options: {"trl": (False, options), "fused": (True, options)}
    made = {}
    for trainer in TRAINERS:
        made[trainer] = (trainer, pair())
        made[f"{trainer}_tied"] = (trainer, pair(family="llama_tied"))
        made[f"{trainer}_peft"] = (trainer, pair(peft=True))
    made["dpo_tdpo2"] = ("dpo", {"fused": (True, dict(loss_type="tdpo2", tdpo_alpha=0.7))})
    made["dpo_spo"] = ("dpo", {"fused": (True, SPO)})
    made["dpo_spo_sampled"] = ("dpo", {"fused": (True, dict(SPO, spo_sampling="sample"))})
    made["grpo_exact_kl"] = ("grpo", {"fused": (True, dict(kl_estimator="exact", beta=0.3))})
    made["rloo_exact_kl"] = ("rloo", {"fused": (True, dict(kl_estimator="exact", beta=0.3))})
    for trainer in ("dpo", "sft"):
        made[f"{trainer}_bf16"] = (trainer, {**pair(precision=BF16), "fp32": (True, {})})
    return made


def run_case(name: str, out: str, model_path) -> dict:
    trainer, runs = cases()[name]
    fn = TRAINERS[trainer]
    results = {}
    for label, (fused, options) in runs.items():
        kwargs = dict(options, out=os.path.join(out, name, label))
        if trainer in RL:
            kwargs["model_path"] = model_path
        results[label] = fn(fused, **kwargs)
    return results


def main(out: str, names) -> None:
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        fsdp_on_cpu()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))

    def model_path(family):
        return os.path.join(out, "models", family)

    for name in names:
        try:
            result = run_case(name, out, model_path)
        except Exception:
            result = {"error": traceback.format_exc()}
        # rank 0 keeps the results (both ranks hold the same weights and logs); any rank its failure
        if rank == 0 or "error" in result:
            torch.save(result, os.path.join(out, f"{name}-rank{rank}.pt"))
    # leave the process group before the interpreter exits: gloo's threads torn down at exit can
    # abort a rank ("terminate called without an active exception") after its cases have passed
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
