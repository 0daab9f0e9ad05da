"""The tuneloom.dev/v1alpha1 API (FineTuneJob, Adapter, ModelServer): typed spec and status, shared
by every component.

The CRD schema is generated from these models, so each field carries its description and its
bounds here, once. Field names are the camelCase names users write in YAML.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

# The data reader enforces it and `validate-data --max-line-bytes` defaults to it; it imports
# only the standard library.
from tuneloom.names import DNS_LABEL_RULE, VERSION_PATTERN, AdapterId, is_dns_label
from tuneloom.trainer.datafile import DEFAULT_MAX_LINE_BYTES

API_GROUP = "tuneloom.dev"
API_VERSION = "v1alpha1"
FULL_API_VERSION = f"{API_GROUP}/{API_VERSION}"

# The trainer's exit statuses, besides 0 (done) and 1 (a failure; the Job controller retries it
# up to spec.scheduling.backoffLimit times). Invalid input (a wrong spec or wrong data): the
# operator fails the job at once instead of letting the Job controller retry.
TRAINER_EXIT_INVALID_INPUT = 2
# Preempted (SIGTERM: eviction, preemption, a deleted pod): the step in progress was finished and a
# checkpoint saved, so the retry resumes there. Not a failure of the job: it is not counted
# against backoffLimit where the cluster can tell (podFailurePolicy, Kubernetes 1.26+).
TRAINER_EXIT_PREEMPTED = 3

DEFAULT_VALIDATION_SPLIT = 0.1
# What a server holds at once when nothing says otherwise (ModelServer and `tuneloom serve`).
DEFAULT_MAX_LORAS = 4
DEFAULT_MAX_LORA_RANK = 16
_STORE_SCHEMES = ("s3://", "file://")


class _Model(BaseModel):
    """Base for every API object: unknown fields are errors, defaults are explicit."""

    model_config = ConfigDict(extra="forbid", populate_by_name=False, validate_default=True)


class DatasetFormat(str, Enum):
    chat = "chat"
    completion = "completion"
    preference = "preference"


class Method(str, Enum):
    lora = "lora"
    qlora = "qlora"
    full = "full"
    # Preference tuning of a LoRA adapter; the reference policy is the same model with the adapter off.
    dpo = "dpo"


class DpoLoss(str, Enum):
    sigmoid = "sigmoid"
    ipo = "ipo"


class GenerationMetric(str, Enum):
    exact_match = "exact_match"
    json_valid = "json_valid"


class PromotionMetric(str, Enum):
    """Held-out metrics a promotion may require the adapter to beat the base model on."""

    validationLoss = "validationLoss"
    tokenAccuracy = "tokenAccuracy"
    exact_match = "exact_match"
    json_valid = "json_valid"


# spec.evaluation.general.prompts naming the prompt set shipped in the trainer's package data.
BUILTIN_GENERAL_PROMPTS = "builtin"


class Phase(str, Enum):
    pending = "Pending"
    queued = "Queued"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"
    cancelled = "Cancelled"
    suspended = "Suspended"


def _check_store_uri(value: str, field: str) -> str:
    if "://" in value and not value.startswith(_STORE_SCHEMES):
        scheme = value.split("://", 1)[0]
        raise ValueError(f"unsupported scheme '{scheme}://' in {field}; use s3://BUCKET/PREFIX, file:///PATH or a path")
    if value.startswith("s3://") and not value[len("s3://") :].split("/", 1)[0]:
        raise ValueError(f"{field} '{value}' names no bucket; use s3://BUCKET/PREFIX")
    return value


def _check_dns_label(value: str) -> str:
    if not is_dns_label(value):
        raise ValueError(f"must be a DNS-1123 label ({DNS_LABEL_RULE}), got {value!r}")
    return value


def _check_base_model(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return _check_store_uri(value, "baseModel")


# A base model as every kind names it: a local directory, a file:// or s3:// prefix, or a hub id.
BaseModelName = Annotated[str, AfterValidator(_check_base_model)]
DnsLabel = Annotated[str, AfterValidator(_check_dns_label)]


class MixSpec(_Model):
    train: str = Field(
        description="JSONL file of other examples (for example general chat) to blend into training: a path, "
        "file:// or s3:// URI, in the dataset's format."
    )
    fraction: float = Field(
        gt=0.0,
        lt=1.0,
        description="Share of the training examples these make up once mixed in; drawn with hyperparameters.seed, "
        "each example once per pass over the file. Never part of the held-out data.",
    )

    @field_validator("train")
    @classmethod
    def _uri(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return _check_store_uri(value, "train")


class DatasetSpec(_Model):
    train: str = Field(description="Training data: a JSONL file as a path, file:// or s3:// URI.")
    validation: str | None = Field(
        default=None,
        description="Held-out JSONL file. When absent, validationSplit of the training data is held out.",
    )
    validationSplit: float = Field(
        default=DEFAULT_VALIDATION_SPLIT,
        gt=0.0,
        lt=0.5,
        description="Fraction of the training examples held out for validation when no validation file is given.",
    )
    format: DatasetFormat = Field(
        default=DatasetFormat.chat,
        description="chat: {'messages': [{'role','content'}]} per line; completion: {'prompt','completion'} per line; "
        "preference: {'input': {'messages'}, 'preferred_output', 'non_preferred_output'} per line (method: dpo).",
    )
    maxLineBytes: int = Field(
        default=DEFAULT_MAX_LINE_BYTES,
        gt=0,
        le=1024 * 1024 * 1024,
        description="Longest line (one example) accepted in the data files, in bytes, without its line ending. "
        "A longer line is reported with its line number and length, and is never held in memory.",
    )
    mix: list[MixSpec] = Field(
        default_factory=list,
        max_length=16,
        description="Other data blended into training, each file at its fraction of the training examples "
        "(fractions sum to under 1), to keep what the base model could do (general.nllShift).",
    )

    @field_validator("train", "validation")
    @classmethod
    def _uri(cls, value: str | None, info: Any) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("must not be empty")
        return _check_store_uri(value, info.field_name)

    @field_validator("mix")
    @classmethod
    def _fractions_leave_room(cls, value: list[MixSpec]) -> list[MixSpec]:
        total = sum(entry.fraction for entry in value)
        if total >= 1.0:
            raise ValueError(
                f"the fractions sum to {total:g}; they must sum to under 1, leaving room for spec.dataset.train"
            )
        return value


class LoraSpec(_Model):
    r: int = Field(default=16, gt=0, le=1024, description="LoRA rank.")
    alpha: int = Field(default=32, gt=0, description="LoRA scaling numerator (the update is scaled by alpha/r).")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    targetModules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        description="Module names to adapt (e.g. q_proj, v_proj), or ['all-linear'] for every linear layer "
        "except the output head.",
    )


def _check_pinned_adapter(value: str) -> str:
    if "/" in value or AdapterId.parse(value, "default").version is None:
        raise ValueError(
            f"must be name@version of an adapter in the job's namespace, e.g. support-sft@3, got {value!r}"
        )
    return value


# One version of an adapter in the object's own namespace.
PinnedAdapterName = Annotated[str, AfterValidator(_check_pinned_adapter)]


class DpoSpec(_Model):
    beta: float = Field(
        default=0.1,
        gt=0.0,
        description="Scale of the implicit reward beta * log(policy/reference); smaller lets the policy move further.",
    )
    loss: DpoLoss = Field(
        default=DpoLoss.sigmoid,
        description="sigmoid: DPO's -log sigmoid of the reward margin, on log-probabilities summed over answer "
        "tokens; ipo: IPO's squared distance of the margin from 1/(2 beta), on log-probabilities averaged over "
        "answer tokens.",
    )
    initAdapter: PinnedAdapterName | None = Field(
        default=None,
        description="An earlier adapter of this namespace, as name@version (e.g. a supervised one): training "
        "starts from its weights and it is the reference policy. Unset: a fresh LoRA adapter, the base model "
        "as reference.",
    )
    qlora: bool = Field(
        default=False,
        description="Train the adapter on a 4-bit NF4 base through bitsandbytes, as method qlora does for "
        "supervised jobs (CUDA only); the reference policy is the same quantised base with the adapter off.",
    )


class EarlyStoppingSpec(_Model):
    patience: int | None = Field(
        default=None,
        ge=1,
        description="Stop after this many evaluations without a lower validation loss. Unset: never stop early.",
    )
    minDelta: float = Field(default=0.0, ge=0.0, description="Smallest decrease of validation loss that counts.")


class HyperparametersSpec(_Model):
    epochs: int = Field(default=3, gt=0, le=1000, description="Passes over the training data.")
    learningRate: float = Field(default=2e-4, gt=0.0, lt=1.0, description="Peak learning rate of AdamW.")
    batchSize: int = Field(
        default=8,
        gt=0,
        le=4096,
        description="Sequences per optimizer micro-batch (packed rows when packing).",
    )
    gradientAccumulationSteps: int = Field(default=1, gt=0, le=1024, description="Micro-batches per optimizer step.")
    microBatchTokens: int = Field(
        default=1024,
        ge=0,
        description="Most token slots (rows x longest row) in one forward and backward pass. A micro-batch over it "
        "runs as several passes whose gradients are summed with the same per-token weight, so the update is the "
        "same and only peak memory falls (activations grow with the tokens in one pass). On a GPU with memory to "
        "spare a larger budget can be faster. 0: no limit.",
    )
    maxSeqLength: int = Field(
        default=1024, ge=16, le=131072, description="Tokens per sequence; longer examples are truncated."
    )
    packing: bool = Field(
        default=True,
        description="Pack several short examples into one sequence. Examples never attend to each other.",
    )
    warmupRatio: float = Field(default=0.03, ge=0.0, lt=1.0, description="Fraction of steps with a linear warm-up.")
    weightDecay: float = Field(default=0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    maxGradNorm: float = Field(default=1.0, gt=0.0, description="Gradient clipping norm.")
    gradientCheckpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass: less memory, about 30% slower.",
    )
    seed: int = Field(default=42, ge=0, description="Seed for the split, the shuffling and the initialisation.")
    loggingSteps: int = Field(default=10, gt=0, description="Optimizer steps between progress lines.")
    earlyStopping: EarlyStoppingSpec = Field(
        default_factory=EarlyStoppingSpec, description="Early stopping on validation loss."
    )


class GeneralEvaluationSpec(_Model):
    enabled: bool = Field(default=True, description="Run the general-ability check; false skips it.")
    prompts: str = Field(
        default=BUILTIN_GENERAL_PROMPTS,
        description="'builtin' (about 100 varied prompts shipped with tuneloom) or a JSONL file (path, file:// or "
        "s3://) of {'messages': [...ending with a user message], 'reference': optional expected answer} lines.",
    )
    maxExamples: int = Field(default=32, ge=1, le=10000, description="Prompts of the set used, from its start.")
    maxNewTokens: int = Field(default=64, gt=0, le=8192, description="Tokens generated per general prompt.")

    @field_validator("prompts")
    @classmethod
    def _uri(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(f"must not be empty; use {BUILTIN_GENERAL_PROMPTS!r} or a JSONL file")
        return value if value == BUILTIN_GENERAL_PROMPTS else _check_store_uri(value, "prompts")


class FewShotSpec(_Model):
    k: int = Field(
        default=3,
        ge=0,
        le=64,
        description="Training examples (drawn with hyperparameters.seed, never held-out ones) shown to the base model "
        "before each held-out prompt, as earlier user/assistant turns (prepended to the prompt in completion format); "
        "its answers are the few-shot baseline the adapter is compared with. 0 turns the baseline off.",
    )


class EvaluationSpec(_Model):
    metrics: list[GenerationMetric] = Field(
        default_factory=list,
        description="Generation metrics computed on held-out examples for the base model and the result.",
    )
    maxNewTokens: int = Field(default=128, gt=0, le=8192, description="Tokens generated per held-out prompt.")
    maxExamples: int = Field(default=50, ge=0, description="Held-out examples used for generation metrics.")
    fewShot: FewShotSpec = Field(
        default_factory=FewShotSpec,
        description="The few-shot baseline: the base model prompted with k training examples, on the same held-out "
        "examples and generation metrics.",
    )
    everySteps: int = Field(
        default=0,
        ge=0,
        description="Also measure the validation loss every this many optimizer steps within an epoch (history, "
        "early stopping); 0: at each epoch's end only.",
    )
    general: GeneralEvaluationSpec = Field(
        default_factory=GeneralEvaluationSpec,
        description="General-ability (forgetting) check: how far the adapter moved from the base model on prompts "
        "unrelated to the task.",
    )


class PromotionSpec(_Model):
    maxGeneralNllShift: float | None = Field(
        default=None, ge=0.0, description="Largest general.nllShift (nats per token) a promoted adapter may have."
    )
    minGeneralAgreement: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Smallest general.agreement (0-1) a promoted adapter may have."
    )
    require: list[PromotionMetric] = Field(
        default_factory=list,
        description="Held-out metrics on which the adapter must beat the base model, e.g. [validationLoss, "
        "exact_match]: a lower validationLoss, a higher tokenAccuracy, exact_match or json_valid. Each must be "
        "measured (the last two in evaluation.metrics).",
    )
    requireBeatFewShot: bool = Field(
        default=False,
        description="Also require the adapter to beat the few-shot baseline (evaluation.fewShot.k > 0) on each "
        "generation metric in require (exact_match, json_valid): when a prompt with examples does as well, "
        "prompting is the cheaper answer.",
    )


class OutputSpec(_Model):
    adapterName: str = Field(
        description="Name of the result in the adapter registry and in vLLM (a DNS-1123 label).",
    )
    uri: str = Field(
        description="Object-store root: s3://BUCKET/PREFIX, file:///PATH or a path. The adapter is written under "
        "<uri>/adapters/<namespace>/<adapterName>/<version>/.",
    )

    @field_validator("adapterName")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        return _check_dns_label(value)

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return _check_store_uri(value, "uri")


class CheckpointingSpec(_Model):
    everySteps: int = Field(default=50, ge=0, description="Optimizer steps between checkpoints; 0 turns them off.")
    keep: int = Field(default=2, ge=1, description="Checkpoints kept in object storage; older ones are deleted.")
    adapterName: DnsLabel | None = Field(
        default=None,
        description="When set, each checkpoint's adapter weights are also published to the registry as "
        "<adapterName>@<step> (a DNS-1123 label other than output.adapterName; version = optimizer step), so a "
        "checkpoint can be served like the final model; kept when older checkpoints are deleted. LoRA-based "
        "methods without fsdp only.",
    )
    gracePeriodSeconds: int = Field(
        default=120,
        ge=1,
        le=86400,
        description="Seconds a preempted or deleted training pod gets, after SIGTERM, to finish its optimizer "
        "step and save a checkpoint before SIGKILL (the pod's terminationGracePeriodSeconds; operator only). "
        "Allow one step and one checkpoint write.",
    )


class DistributedStrategy(str, Enum):
    ddp = "ddp"
    fsdp = "fsdp"


class DistributedSpec(_Model):
    strategy: DistributedStrategy | None = Field(
        default=None,
        description="How several processes share the model: ddp (every process holds it whole; gradients are "
        "averaged) or fsdp (FSDP2: parameters, gradients and optimizer state sharded over the processes, "
        "checkpoints sharded with torch.distributed.checkpoint). Unset: fsdp for method full with more than one "
        "process, else ddp. One process shards nothing either way.",
    )
    cpuOffload: bool = Field(
        default=False,
        description="fsdp on GPUs: keep the sharded parameters, gradients and optimizer state in CPU memory "
        "between uses (slower; for models whose shards do not fit GPU memory). On CPUs it changes nothing.",
    )


class Toleration(_Model):
    key: str | None = Field(default=None, description="Taint key to tolerate; unset with Exists: every taint.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default).")
    value: str | None = Field(default=None, description="Taint value, with operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; unset: all."
    )
    tolerationSeconds: int | None = Field(default=None, description="How long a NoExecute taint is tolerated.")


class ResourcesSpec(_Model):
    gpus: int = Field(default=1, ge=0, le=64, description="GPUs for each pod (nvidia.com/gpu).")
    cpu: str | None = Field(default=None, description="CPU request, e.g. '4'.")
    memory: str | None = Field(default=None, description="Memory request and limit, e.g. '32Gi'.")
    nodeSelector: dict[str, str] = Field(default_factory=dict, description="Node labels the pods need.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations of the pods.")


class TrainingResourcesSpec(ResourcesSpec):
    """A training pod's resources, how many nodes run it, and what its GPU time costs."""

    nodes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Nodes (pods) that train together, each with `gpus` GPUs (at least one process each); more "
        "than 1: one pod per node, joined by torchrun's c10d rendezvous and restarted as a group.",
    )

    costPerGpuHour: float | None = Field(
        default=None,
        ge=0.0,
        description="Price of one GPU-hour, for the cost in the estimate before training and in the result; "
        "unset: the operator's price (the chart's trainer.estimate.gpuHourPrice), else no cost is given.",
    )


class StorageSpec(_Model):
    endpoint: str | None = Field(
        default=None, description="S3 endpoint URL for S3-compatible stores (MinIO, SeaweedFS); unset: AWS."
    )
    region: str | None = Field(default=None, description="S3 region.")
    credentialsSecret: str | None = Field(
        default=None,
        description="Secret in the object's namespace with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; "
        "unset: the pod's own identity (e.g. IRSA).",
    )


class SchedulingSpec(_Model):
    queueName: str | None = Field(default=None, description="Kueue LocalQueue; sets kueue.x-k8s.io/queue-name.")
    activeDeadlineSeconds: int | None = Field(default=None, gt=0, description="Fail the run after this long.")
    backoffLimit: int = Field(
        default=2,
        ge=0,
        le=20,
        description="Pod retries after infrastructure failures; with resources.nodes > 1, restarts of the whole group.",
    )
    priorityClassName: str | None = Field(default=None, description="PriorityClass of the training pod.")


class ServeSpec(_Model):
    modelServer: str | None = Field(
        default=None,
        description="A ModelServer in this namespace: on success the adapter is added to its spec.preload.adapters, "
        "so its replicas load it eagerly. May be set or changed while the job runs.",
    )


class FineTuneJobSpec(_Model):
    baseModel: BaseModelName = Field(
        description="Base model: a local directory, an s3:// prefix holding a Hugging Face model directory, "
        "or a Hugging Face hub id.",
    )
    dataset: DatasetSpec = Field(description="Training and validation data.")
    method: Method = Field(
        default=Method.lora,
        description="lora, qlora (4-bit NF4 base, CUDA only), full, or dpo (preference tuning of a LoRA adapter on "
        "dataset.format: preference).",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings (lora, qlora and dpo).")
    dpo: DpoSpec = Field(default_factory=DpoSpec, description="Preference-tuning settings (method: dpo).")
    hyperparameters: HyperparametersSpec = Field(default_factory=HyperparametersSpec, description="Optimisation.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Held-out evaluation.")
    promotion: PromotionSpec = Field(
        default_factory=PromotionSpec,
        description="What a version must achieve to be promoted (what a bare adapter name serves); unset: record "
        "the metrics and promote.",
    )
    output: OutputSpec = Field(description="Where the result is written.")
    checkpointing: CheckpointingSpec = Field(default_factory=CheckpointingSpec, description="Checkpoints.")
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="How several training processes share the model."
    )
    resources: TrainingResourcesSpec = Field(
        default_factory=TrainingResourcesSpec, description="Pod resources (operator only) and the GPU-hour price."
    )
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Object-store connection (operator only).")
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec, description="Queueing and limits (operator).")
    image: str | None = Field(default=None, description="Trainer image; unset: the operator's default.")
    cancel: bool = Field(default=False, description="Set to true to stop the run; the phase becomes Cancelled.")
    suspend: bool = Field(
        default=False,
        description="Set to true to pause the run: the operator deletes its pods (the trainer saves a checkpoint on "
        "SIGTERM) and the phase becomes Suspended; set back to false to resume from the latest checkpoint.",
    )
    serve: ServeSpec = Field(default_factory=ServeSpec, description="Where the result is served (operator only).")

    @model_validator(mode="after")
    def _lora_fits_method(self) -> FineTuneJobSpec:
        # "Given" means other than the defaults: the API server writes the CRD's defaults into every
        # stored object, so a block at its defaults is one nobody set.
        if self.method is Method.full and self.lora != LoraSpec():
            raise ValueError("lora settings are given but method is 'full'; remove spec.lora or use lora/qlora")
        if self.method is not Method.dpo and self.dpo != DpoSpec():
            raise ValueError(f"dpo settings are given but method is {self.method.value!r}; remove spec.dpo or use dpo")
        if self.quantized_base and self.distributed.strategy is DistributedStrategy.fsdp:
            raise ValueError(
                "spec.distributed.strategy: fsdp cannot shard qlora's 4-bit base weights (method qlora, or dpo with "
                "dpo.qlora); use strategy ddp (or leave it unset) with them, or a bf16 base (lora, dpo) with fsdp"
            )
        sharded = self.distributed.strategy is DistributedStrategy.fsdp or (
            self.distributed.strategy is None and self.method is Method.full
        )
        if self.distributed.cpuOffload and not sharded:
            raise ValueError(
                "spec.distributed.cpuOffload offloads fsdp's shards: set spec.distributed.strategy: fsdp (unset "
                "means fsdp only for method full)"
            )
        preference = self.dataset.format is DatasetFormat.preference
        if preference != (self.method is Method.dpo):
            raise ValueError(
                "method: dpo trains on preference pairs: it needs dataset.format: preference, and that format "
                f"needs method: dpo (got method {self.method.value!r}, format {self.dataset.format.value!r})"
            )
        return self

    @model_validator(mode="after")
    def _checkpoint_adapters_fit(self) -> FineTuneJobSpec:
        name = self.checkpointing.adapterName
        if name is not None and self.method is Method.full:
            raise ValueError("checkpointing.adapterName publishes LoRA adapters; remove it or use a LoRA-based method")
        if name is not None and self.distributed.strategy is DistributedStrategy.fsdp:
            raise ValueError(
                "checkpointing.adapterName needs the adapter whole on one process during training, which fsdp "
                "shards; use spec.distributed.strategy: ddp (or leave it unset) with it"
            )
        if name is not None and name == self.output.adapterName:
            raise ValueError(
                "checkpointing.adapterName must differ from output.adapterName: checkpoints are versioned by step, "
                "the final adapter by release"
            )
        return self

    @property
    def quantized_base(self) -> bool:
        """Whether the base is loaded in 4-bit NF4: method qlora, or dpo with dpo.qlora."""
        return self.method is Method.qlora or (self.method is Method.dpo and self.dpo.qlora)


class ObjectMeta(_Model):
    model_config = ConfigDict(extra="allow")
    name: str = Field(description="Object name.")
    namespace: str = Field(default="default", description="Namespace; also the adapter registry's namespace.")
    uid: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Condition(_Model):
    type: str = Field(
        description="FineTuneJob: Accepted, Queued, Running, Succeeded, Failed, Cancelled, Suspended, "
        "SpecChangeRefused, Served, Promoted, Overfitting, GroupRestart; "
        "Adapter: Ready; ModelServer: Ready, AdaptersLoaded."
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase reason, for machines.")
    message: str = Field(default="", description="What happened and what to do, for people.")
    lastTransitionTime: datetime | None = Field(default=None, description="When status last changed.")


class Progress(_Model):
    percent: int = Field(default=0, description="Share of optimizer steps done, 0-100.")
    step: int = Field(default=0, description="Optimizer steps done.")
    totalSteps: int = Field(default=0, description="Optimizer steps planned.")
    epoch: float = Field(default=0.0, description="Fractional epoch reached.")
    trainLoss: float | None = Field(default=None, description="Mean training loss over the last logging interval.")
    validationLoss: float | None = Field(default=None, description="Validation loss at the last evaluation.")
    rewardAccuracy: float | None = Field(
        default=None,
        description="method: dpo: share of the last logging interval's training pairs whose preferred answer got "
        "the higher implicit reward.",
    )
    rewardMargin: float | None = Field(
        default=None,
        description="method: dpo: mean implicit reward of the preferred answer minus the other's, over the last "
        "logging interval's training pairs.",
    )
    tokensPerSecond: float | None = Field(default=None, description="Training throughput, padding excluded.")
    etaSeconds: float | None = Field(default=None, description="Estimated seconds until training ends.")


class AdapterPromotion(_Model):
    promoted: bool = Field(
        default=True,
        description="Whether the version passed spec.promotion; a bare name serves only promoted versions.",
    )
    reasons: list[str] = Field(
        default_factory=list, description="Each requirement it failed: the metric, its value and the threshold."
    )


class PublishedAdapter(_Model):
    name: str = Field(description="Adapter name in the registry.")
    version: str = Field(description="Version written by this job.")
    uri: str = Field(description="Object-store URI of the version's folder.")
    sha256: str = Field(description="sha256 of the adapter's manifest.json.")
    baseValidationLoss: float | None = Field(default=None, description="Held-out loss of the base model.")
    validationLoss: float | None = Field(default=None, description="Held-out loss with the adapter.")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Held-out generation metrics with the adapter (e.g. json_valid)."
    )
    baseMetrics: dict[str, float] = Field(
        default_factory=dict, description="The same generation metrics for the base model."
    )
    promotion: AdapterPromotion | None = Field(
        default=None, description="The promotion gate's verdict, from the manifest; unset: promoted."
    )
    fewShotMetrics: dict[str, float] = Field(
        default_factory=dict,
        description="The same generation metrics for the few-shot baseline (the base model shown "
        "spec.evaluation.fewShot.k training examples); empty when it was off.",
    )
    trainSeconds: float | None = Field(default=None, description="Measured seconds of training.")
    gpuSeconds: float | None = Field(default=None, description="Measured GPU-seconds of training (0 on CPU).")
    tokensSeen: int | None = Field(
        default=None, description="Tokens trained on in all epochs, padding excluded (the manifest's tokensSeen)."
    )
    cost: float | None = Field(default=None, description="gpuSeconds at spec.resources.costPerGpuHour, when set.")
    estimatedSeconds: float | None = Field(
        default=None, description="The seconds the estimate before training expected, to compare with trainSeconds."
    )


class TrainingEstimate(_Model):
    tokens: int = Field(default=0, description="Training tokens in all epochs, padding excluded.")
    steps: int = Field(default=0, description="Optimizer steps.")
    seconds: float = Field(default=0.0, description="Expected seconds of training on the job's device.")
    cost: float | None = Field(
        default=None, description="Expected cost at spec.resources.costPerGpuHour; unset without a price."
    )


class NodeStatus(_Model):
    rank: int = Field(description="Node rank: the pod's JOB_COMPLETION_INDEX, 0 to spec.resources.nodes - 1.")
    pod: str | None = Field(default=None, description="The node's current pod; unset until it is created.")
    phase: str = Field(default="Pending", description="The pod's phase: Pending, Running, Succeeded or Failed.")
    reason: str = Field(default="", description="Why it failed, for machines (e.g. ExitCode1, PodDeleted).")
    message: str = Field(default="", description="Why it failed, for people: the exit code and last lines.")


class FineTuneJobStatus(_Model):
    phase: Phase = Field(
        default=Phase.pending, description="Pending, Queued, Running, Succeeded, Failed, Cancelled, Suspended."
    )
    message: str = Field(default="", description="The latest news, in a sentence.")
    conditions: list[Condition] = Field(default_factory=list, description="Detailed state, one entry per type.")
    observedGeneration: int | None = Field(default=None, description="The spec generation the status describes.")
    startTime: datetime | None = Field(default=None, description="When training started.")
    completionTime: datetime | None = Field(default=None, description="When the job ended.")
    jobName: str | None = Field(default=None, description="The batch/v1 Job running the trainer.")
    estimate: TrainingEstimate | None = Field(
        default=None,
        description="Tokens, steps, time and cost expected, by the trainer's throughput model once it has counted "
        "the tokens; the measured figures follow in progress and, at the end, in adapter.",
    )
    progress: Progress | None = Field(default=None, description="Training progress, refreshed about every 5 s.")
    adapter: PublishedAdapter | None = Field(default=None, description="The adapter written, read from its manifest.")
    preempted: int = Field(
        default=0,
        ge=0,
        description="Times the trainer was preempted (SIGTERM: eviction, preemption, a deleted pod), saved a "
        "checkpoint and was retried from it; each one posts a Preempted Event. Not a failure: the phase stays "
        "Running or Pending.",
    )
    suspendSaves: int = Field(
        default=0,
        ge=0,
        description="Checkpoints the trainer saved on the SIGTERM of a spec.suspend; the trainer records them "
        "as it records preemptions, and they are not counted in preempted.",
    )
    nodes: list[NodeStatus] = Field(
        default_factory=list, description="Multi-node jobs (spec.resources.nodes > 1): each node's pod and state."
    )
    failedRank: int | None = Field(
        default=None, description="Multi-node jobs: the node rank whose failure last restarted or failed the group."
    )
    groupRestarts: int = Field(
        default=0,
        ge=0,
        description="Multi-node jobs: restarts of all nodes after a rank failed, counted against "
        "spec.scheduling.backoffLimit (preemptions and deleted pods restart the group without counting).",
    )


class FineTuneJob(_Model):
    apiVersion: Literal["tuneloom.dev/v1alpha1"] = Field(description="tuneloom.dev/v1alpha1")
    kind: Literal["FineTuneJob"] = Field(description="FineTuneJob")
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    @property
    def identity(self) -> str:
        """Stable identity of one job: restarts with the same identity resume its checkpoints."""
        return f"{self.metadata.namespace}/{self.metadata.name}"


# --- Adapter ------------------------------------------------------------------------------------


class AdapterPhase(str, Enum):
    pending = "Pending"
    ready = "Ready"
    failed = "Failed"


class StoreSpec(StorageSpec):
    """An object-store root and how to reach it: what reads the adapter registry needs."""

    uri: str = Field(
        description="Object-store root holding the adapter registry (a FineTuneJob's output.uri): "
        "s3://BUCKET/PREFIX, file:///PATH or a path.",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return _check_store_uri(value, "uri")


class RegistryRef(_Model):
    name: str | None = Field(
        default=None,
        description="Adapter name in this namespace's registry (written by a FineTuneJob); unset: the Adapter's name.",
    )
    version: str | None = Field(
        default=None,
        pattern=VERSION_PATTERN,
        description="Version to serve, e.g. '3'; unset: the latest committed version, followed as new ones appear.",
    )

    @field_validator("name")
    @classmethod
    def _dns_label(cls, value: str | None) -> str | None:
        return None if value is None else _check_dns_label(value)


class AdapterSource(_Model):
    # Exactly one source; the schema says so too, so the API server refuses both or neither.
    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["registry"]}, {"required": ["uri"]}]})

    registry: RegistryRef | None = Field(default=None, description="A version in this namespace's adapter registry.")
    uri: str | None = Field(
        default=None,
        description="A PEFT directory trained elsewhere (adapter_config.json and adapter_model.safetensors), "
        "s3://BUCKET/PREFIX or file:///PATH. It is checked and imported into the registry as a new version, under "
        "the Adapter's name; to import changed files, point the spec at a new directory.",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        return None if value is None else _check_store_uri(value, "uri")

    @model_validator(mode="after")
    def _exactly_one(self) -> AdapterSource:
        if (self.registry is None) == (self.uri is None):
            raise ValueError("set exactly one of source.registry and source.uri")
        return self


class AdapterSpec(_Model):
    baseModel: BaseModelName = Field(
        description="The base model the adapter belongs to, as in FineTuneJob.spec.baseModel. It is checked "
        "against the adapter's manifest (config hash when the operator can read the base model, else the name) "
        "or its PEFT config (base_model_name_or_path).",
    )
    source: AdapterSource = Field(description="Where the adapter's files are: a registry version or a PEFT folder.")
    storage: StoreSpec = Field(description="The object store holding the adapter registry, and how to reach it.")


class LoadedOn(_Model):
    modelServer: str = Field(description="Name of the ModelServer.")
    namespace: str = Field(description="Namespace of the ModelServer.")
    pods: list[str] = Field(default_factory=list, description="Its pods that have a version of this adapter loaded.")


class AdapterStatus(_Model):
    phase: AdapterPhase = Field(default=AdapterPhase.pending, description="Pending, Ready or Failed.")
    message: str = Field(default="", description="The latest news, in a sentence.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready, with a reason when it is not.")
    observedGeneration: int | None = Field(default=None, description="The spec generation the status describes.")
    version: str | None = Field(default=None, description="The registry version checked (the latest, unless pinned).")
    uri: str | None = Field(default=None, description="Object-store URI of the version's folder.")
    sha256: str | None = Field(default=None, description="sha256 of the version's manifest.json.")
    model: str | None = Field(
        default=None, description="The id ModelServers load and list it under: <namespace>/<name>@<version>."
    )
    rank: int | None = Field(default=None, description="LoRA rank (r) from adapter_config.json.")
    validationLoss: float | None = Field(default=None, description="Held-out loss with the adapter, when known.")
    baseValidationLoss: float | None = Field(default=None, description="Held-out loss of the base model, when known.")
    tokenAccuracy: float | None = Field(default=None, description="Held-out next-token accuracy, when known.")
    promoted: bool | None = Field(
        default=None, description="Whether the version passed its promotion gate (unset: no manifest read yet)."
    )
    promotionReasons: list[str] = Field(
        default_factory=list, description="Why it was not promoted: each metric, its value and the threshold."
    )
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Held-out generation metrics with the adapter (e.g. exact_match), when known."
    )
    baseMetrics: dict[str, float] = Field(default_factory=dict, description="The same metrics for the base model.")
    fewShotMetrics: dict[str, float] = Field(
        default_factory=dict, description="The same metrics for the few-shot baseline, when it ran."
    )
    loadedOn: list[LoadedOn] = Field(default_factory=list, description="ModelServers and pods that have it loaded.")


class Adapter(_Model):
    apiVersion: Literal["tuneloom.dev/v1alpha1"] = Field(description="tuneloom.dev/v1alpha1")
    kind: Literal["Adapter"] = Field(description="Adapter")
    metadata: ObjectMeta
    spec: AdapterSpec
    status: AdapterStatus | None = None


# --- ModelServer --------------------------------------------------------------------------------

# vLLM accepts only these LoRA ranks for --max-lora-rank.
MaxLoraRank = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]


class LabelSelectorRequirement(_Model):
    key: str = Field(description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(description="In, NotIn, Exists, DoesNotExist.")
    values: list[str] = Field(default_factory=list, description="Values, for In and NotIn.")


class LabelSelector(_Model):
    matchLabels: dict[str, str] = Field(default_factory=dict, description="Labels an Adapter must have.")
    matchExpressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, description="Requirements on an Adapter's labels, all of which must hold."
    )


class PreloadSpec(_Model):
    adapters: list[str] = Field(
        default_factory=list,
        description="Adapters every ready replica loads eagerly: <name> in this namespace, or <namespace>/<name> in an "
        "allowed namespace. Their latest Ready version is loaded, replacing an older one the operator loaded.",
    )
    selector: LabelSelector | None = Field(
        default=None, description="Also preload every Ready Adapter with matching labels in the allowed namespaces."
    )


class SecretKeyRef(_Model):
    name: str = Field(description="Secret in the ModelServer's namespace.")
    key: str = Field(default="api-key", description="Key in the Secret holding the API key.")


class ModelServerSpec(_Model):
    baseModel: BaseModelName = Field(
        description="The base model to serve, as in FineTuneJob.spec.baseModel; only adapters for it are preloaded.",
    )
    replicas: int = Field(default=1, ge=0, le=1000, description="Server pods. Changing it restarts no pod.")
    image: str | None = Field(default=None, description="Server image; unset: the operator's default.")
    extraArgs: list[str] = Field(default_factory=list, description="Further vLLM arguments, e.g. --max-model-len=4096.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Each server pod's resources.")
    maxLoras: int = Field(
        default=DEFAULT_MAX_LORAS, ge=1, le=256, description="Adapters vLLM holds on the GPU at once (--max-loras)."
    )
    maxLoraRank: MaxLoraRank = Field(
        default=DEFAULT_MAX_LORA_RANK,
        description="Largest LoRA rank served (--max-lora-rank); adapters of higher rank are not preloaded.",
    )
    maxCpuLoras: int | None = Field(
        default=None, ge=1, description="Adapters kept in CPU memory (--max-cpu-loras); unset: maxLoras, as vLLM does."
    )
    preload: PreloadSpec = Field(
        default_factory=PreloadSpec,
        description="Adapters loaded ahead of the first request. The operator pushes them to ready pods over HTTP, "
        "so changes restart no pod. Any other adapter of an allowed namespace is loaded on first use.",
    )
    apiKeySecret: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the API key clients must send; unset: no authentication."
    )
    storage: StoreSpec = Field(description="The object store holding the adapter registry, and how to reach it.")
    allowedNamespaces: list[str] = Field(
        default_factory=list,
        description="Namespaces whose adapters this server may load; empty: its own namespace only.",
    )
    allowUnpromoted: bool = Field(
        default=False,
        description="Serve unpromoted versions when a client pins them (name@version), for inspection; a bare name "
        "always means the latest promoted version.",
    )

    @field_validator("allowedNamespaces")
    @classmethod
    def _namespaces(cls, value: list[str]) -> list[str]:
        return [_check_dns_label(namespace) for namespace in value]

    @model_validator(mode="after")
    def _cpu_loras_hold_gpu_loras(self) -> ModelServerSpec:
        if self.maxCpuLoras is not None and self.maxCpuLoras < self.maxLoras:
            raise ValueError(f"maxCpuLoras ({self.maxCpuLoras}) must be >= maxLoras ({self.maxLoras})")
        return self


class ServerPod(_Model):
    name: str = Field(description="Pod name.")
    ready: bool = Field(default=False, description="Whether the pod passes its readiness probe.")
    adapters: list[str] = Field(
        default_factory=list, description="Adapters loaded on it (preloaded or on first use), as <ns>/<name>@<version>."
    )
    preloaded: list[str] = Field(
        default_factory=list, description="Those the operator loaded; it unloads them when they leave the preload set."
    )


class ModelServerStatus(_Model):
    replicas: int = Field(default=0, description="Server pods that exist.")
    readyReplicas: int = Field(default=0, description="Server pods that are ready.")
    selector: str | None = Field(default=None, description="Label selector of the pods (for kubectl scale and HPA).")
    message: str = Field(default="", description="The latest news, in a sentence.")
    conditions: list[Condition] = Field(default_factory=list, description="Ready and AdaptersLoaded.")
    observedGeneration: int | None = Field(default=None, description="The spec generation the status describes.")
    pods: list[ServerPod] = Field(default_factory=list, description="Each pod and the adapters loaded on it.")


class ModelServer(_Model):
    apiVersion: Literal["tuneloom.dev/v1alpha1"] = Field(description="tuneloom.dev/v1alpha1")
    kind: Literal["ModelServer"] = Field(description="ModelServer")
    metadata: ObjectMeta
    spec: ModelServerSpec
    status: ModelServerStatus | None = None
