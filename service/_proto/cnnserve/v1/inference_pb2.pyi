from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Capability(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAPABILITY_UNSPECIFIED: _ClassVar[Capability]
    CAPABILITY_CLASSIFY: _ClassVar[Capability]
    CAPABILITY_EXPLAIN: _ClassVar[Capability]
    CAPABILITY_DREAM: _ClassVar[Capability]
    CAPABILITY_STYLIZE: _ClassVar[Capability]
    CAPABILITY_EMBED: _ClassVar[Capability]
    CAPABILITY_FEATURE_MAPS: _ClassVar[Capability]
    CAPABILITY_FILTERS: _ClassVar[Capability]

class ExplainMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPLAIN_METHOD_UNSPECIFIED: _ClassVar[ExplainMethod]
    EXPLAIN_METHOD_GUIDED_BACKPROP: _ClassVar[ExplainMethod]
    EXPLAIN_METHOD_GUIDED_GRADCAM: _ClassVar[ExplainMethod]
    EXPLAIN_METHOD_GRADCAM: _ClassVar[ExplainMethod]

class StyleOptimizer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STYLE_OPTIMIZER_UNSPECIFIED: _ClassVar[StyleOptimizer]
    STYLE_OPTIMIZER_LBFGS: _ClassVar[StyleOptimizer]
    STYLE_OPTIMIZER_ADAM: _ClassVar[StyleOptimizer]

class StyleInit(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STYLE_INIT_UNSPECIFIED: _ClassVar[StyleInit]
    STYLE_INIT_CONTENT: _ClassVar[StyleInit]
    STYLE_INIT_NOISE: _ClassVar[StyleInit]
CAPABILITY_UNSPECIFIED: Capability
CAPABILITY_CLASSIFY: Capability
CAPABILITY_EXPLAIN: Capability
CAPABILITY_DREAM: Capability
CAPABILITY_STYLIZE: Capability
CAPABILITY_EMBED: Capability
CAPABILITY_FEATURE_MAPS: Capability
CAPABILITY_FILTERS: Capability
EXPLAIN_METHOD_UNSPECIFIED: ExplainMethod
EXPLAIN_METHOD_GUIDED_BACKPROP: ExplainMethod
EXPLAIN_METHOD_GUIDED_GRADCAM: ExplainMethod
EXPLAIN_METHOD_GRADCAM: ExplainMethod
STYLE_OPTIMIZER_UNSPECIFIED: StyleOptimizer
STYLE_OPTIMIZER_LBFGS: StyleOptimizer
STYLE_OPTIMIZER_ADAM: StyleOptimizer
STYLE_INIT_UNSPECIFIED: StyleInit
STYLE_INIT_CONTENT: StyleInit
STYLE_INIT_NOISE: StyleInit

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class ImageInput(_message.Message):
    __slots__ = ("encoded", "tensor")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    tensor: Tensor
    def __init__(self, encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("model", "version", "top_k", "image")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    top_k: int
    image: ImageInput
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., top_k: _Optional[int] = ..., image: _Optional[_Union[ImageInput, _Mapping]] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "label", "probability")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    probability: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_seconds", "preprocess_seconds", "queue_seconds", "inference_seconds", "total_seconds")
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    decode_seconds: float
    preprocess_seconds: float
    queue_seconds: float
    inference_seconds: float
    total_seconds: float
    def __init__(self, decode_seconds: _Optional[float] = ..., preprocess_seconds: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., inference_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("model", "version", "classes", "timings", "untrained")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    classes: _containers.RepeatedCompositeFieldContainer[ClassScore]
    timings: Timings
    untrained: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., classes: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., untrained: bool = ...) -> None: ...

class ClassifyBatchRequest(_message.Message):
    __slots__ = ("model", "version", "top_k", "images")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    top_k: int
    images: _containers.RepeatedCompositeFieldContainer[ImageInput]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., top_k: _Optional[int] = ..., images: _Optional[_Iterable[_Union[ImageInput, _Mapping]]] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("classes",)
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedCompositeFieldContainer[ClassScore]
    def __init__(self, classes: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ...) -> None: ...

class ClassifyBatchResponse(_message.Message):
    __slots__ = ("model", "version", "results", "timings", "untrained")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    results: _containers.RepeatedCompositeFieldContainer[Classification]
    timings: Timings
    untrained: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., results: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., untrained: bool = ...) -> None: ...

class ClassifyStreamRequest(_message.Message):
    __slots__ = ("id", "request")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    request: ClassifyRequest
    def __init__(self, id: _Optional[str] = ..., request: _Optional[_Union[ClassifyRequest, _Mapping]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("model", "version", "image", "normalize", "top_k")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    image: ImageInput
    normalize: bool
    top_k: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., image: _Optional[_Union[ImageInput, _Mapping]] = ..., normalize: bool = ..., top_k: _Optional[int] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("model", "version", "embedding", "norm", "classes", "timings", "untrained")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    embedding: Tensor
    norm: float
    classes: _containers.RepeatedCompositeFieldContainer[ClassScore]
    timings: Timings
    untrained: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., embedding: _Optional[_Union[Tensor, _Mapping]] = ..., norm: _Optional[float] = ..., classes: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., untrained: bool = ...) -> None: ...

class EmbedStreamRequest(_message.Message):
    __slots__ = ("id", "request")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    request: EmbedRequest
    def __init__(self, id: _Optional[str] = ..., request: _Optional[_Union[EmbedRequest, _Mapping]] = ...) -> None: ...

class EmbedStreamResponse(_message.Message):
    __slots__ = ("id", "result", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    result: EmbedResponse
    error: Status
    def __init__(self, id: _Optional[str] = ..., result: _Optional[_Union[EmbedResponse, _Mapping]] = ..., error: _Optional[_Union[Status, _Mapping]] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ClassifyStreamResponse(_message.Message):
    __slots__ = ("id", "result", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    result: ClassifyResponse
    error: Status
    def __init__(self, id: _Optional[str] = ..., result: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., error: _Optional[_Union[Status, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version", "include_labels")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_LABELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    include_labels: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., include_labels: bool = ...) -> None: ...

class LayerInfo(_message.Message):
    __slots__ = ("name", "shape", "kind")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    kind: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., kind: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("color_mode", "resize", "crop", "mean", "std", "invert")
    COLOR_MODE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    CROP_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    INVERT_FIELD_NUMBER: _ClassVar[int]
    color_mode: str
    resize: int
    crop: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    invert: bool
    def __init__(self, color_mode: _Optional[str] = ..., resize: _Optional[int] = ..., crop: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., invert: bool = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "versions", "architecture", "input", "output", "num_classes", "labels_count", "labels", "preprocessing", "trained", "trained_on", "parameters", "flops", "execution_provider", "capabilities", "ready", "input_description", "serving", "features", "layers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    LABELS_COUNT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    TRAINED_ON_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    INPUT_DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    architecture: str
    input: TensorSpec
    output: TensorSpec
    num_classes: int
    labels_count: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    preprocessing: Preprocessing
    trained: bool
    trained_on: str
    parameters: int
    flops: int
    execution_provider: str
    capabilities: _containers.RepeatedScalarFieldContainer[Capability]
    ready: bool
    input_description: str
    serving: ServingConfig
    features: TensorSpec
    layers: _containers.RepeatedCompositeFieldContainer[LayerInfo]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ..., architecture: _Optional[str] = ..., input: _Optional[_Union[TensorSpec, _Mapping]] = ..., output: _Optional[_Union[TensorSpec, _Mapping]] = ..., num_classes: _Optional[int] = ..., labels_count: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., trained: bool = ..., trained_on: _Optional[str] = ..., parameters: _Optional[int] = ..., flops: _Optional[int] = ..., execution_provider: _Optional[str] = ..., capabilities: _Optional[_Iterable[_Union[Capability, str]]] = ..., ready: bool = ..., input_description: _Optional[str] = ..., serving: _Optional[_Union[ServingConfig, _Mapping]] = ..., features: _Optional[_Union[TensorSpec, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[LayerInfo, _Mapping]]] = ...) -> None: ...

class ServingConfig(_message.Message):
    __slots__ = ("max_batch_size", "max_queue_delay_s", "max_queue_size", "warmup_batch_sizes", "device", "version_policy", "config_file", "instances", "intra_op_threads", "precision")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_S_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_POLICY_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FILE_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    INTRA_OP_THREADS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_queue_delay_s: float
    max_queue_size: int
    warmup_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    device: str
    version_policy: str
    config_file: str
    instances: int
    intra_op_threads: int
    precision: str
    def __init__(self, max_batch_size: _Optional[int] = ..., max_queue_delay_s: _Optional[float] = ..., max_queue_size: _Optional[int] = ..., warmup_batch_sizes: _Optional[_Iterable[int]] = ..., device: _Optional[str] = ..., version_policy: _Optional[str] = ..., config_file: _Optional[str] = ..., instances: _Optional[int] = ..., intra_op_threads: _Optional[int] = ..., precision: _Optional[str] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "version", "images", "target_classes", "method", "include_plain_gradient", "neuron")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TARGET_CLASSES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PLAIN_GRADIENT_FIELD_NUMBER: _ClassVar[int]
    NEURON_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    images: _containers.RepeatedCompositeFieldContainer[ImageInput]
    target_classes: _containers.RepeatedScalarFieldContainer[int]
    method: ExplainMethod
    include_plain_gradient: bool
    neuron: NeuronTarget
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., images: _Optional[_Iterable[_Union[ImageInput, _Mapping]]] = ..., target_classes: _Optional[_Iterable[int]] = ..., method: _Optional[_Union[ExplainMethod, str]] = ..., include_plain_gradient: bool = ..., neuron: _Optional[_Union[NeuronTarget, _Mapping]] = ...) -> None: ...

class NeuronTarget(_message.Message):
    __slots__ = ("layer", "channel", "y", "x")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    layer: str
    channel: int
    y: int
    x: int
    def __init__(self, layer: _Optional[str] = ..., channel: _Optional[int] = ..., y: _Optional[int] = ..., x: _Optional[int] = ...) -> None: ...

class NeuronExplained(_message.Message):
    __slots__ = ("layer", "channel", "y", "x", "activation", "field_top", "field_left", "field_bottom", "field_right")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    FIELD_TOP_FIELD_NUMBER: _ClassVar[int]
    FIELD_LEFT_FIELD_NUMBER: _ClassVar[int]
    FIELD_BOTTOM_FIELD_NUMBER: _ClassVar[int]
    FIELD_RIGHT_FIELD_NUMBER: _ClassVar[int]
    layer: str
    channel: int
    y: int
    x: int
    activation: float
    field_top: int
    field_left: int
    field_bottom: int
    field_right: int
    def __init__(self, layer: _Optional[str] = ..., channel: _Optional[int] = ..., y: _Optional[int] = ..., x: _Optional[int] = ..., activation: _Optional[float] = ..., field_top: _Optional[int] = ..., field_left: _Optional[int] = ..., field_bottom: _Optional[int] = ..., field_right: _Optional[int] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("saliency", "png", "explained", "predicted", "plain_gradient", "gradcam", "neuron")
    SALIENCY_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    EXPLAINED_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    PLAIN_GRADIENT_FIELD_NUMBER: _ClassVar[int]
    GRADCAM_FIELD_NUMBER: _ClassVar[int]
    NEURON_FIELD_NUMBER: _ClassVar[int]
    saliency: Tensor
    png: bytes
    explained: ClassScore
    predicted: ClassScore
    plain_gradient: Tensor
    gradcam: Tensor
    neuron: NeuronExplained
    def __init__(self, saliency: _Optional[_Union[Tensor, _Mapping]] = ..., png: _Optional[bytes] = ..., explained: _Optional[_Union[ClassScore, _Mapping]] = ..., predicted: _Optional[_Union[ClassScore, _Mapping]] = ..., plain_gradient: _Optional[_Union[Tensor, _Mapping]] = ..., gradcam: _Optional[_Union[Tensor, _Mapping]] = ..., neuron: _Optional[_Union[NeuronExplained, _Mapping]] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("model", "version", "method", "explanations", "seconds", "untrained")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    method: ExplainMethod
    explanations: _containers.RepeatedCompositeFieldContainer[Explanation]
    seconds: float
    untrained: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., method: _Optional[_Union[ExplainMethod, str]] = ..., explanations: _Optional[_Iterable[_Union[Explanation, _Mapping]]] = ..., seconds: _Optional[float] = ..., untrained: bool = ...) -> None: ...

class DreamLayer(_message.Message):
    __slots__ = ("layer", "weight", "channels")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    layer: str
    weight: float
    channels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[str] = ..., weight: _Optional[float] = ..., channels: _Optional[_Iterable[int]] = ...) -> None: ...

class DreamRequest(_message.Message):
    __slots__ = ("model", "version", "image", "layers", "octaves", "octave_scale", "steps", "step_size", "jitter", "tile_size", "max_side", "seed", "preview_every")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    OCTAVES_FIELD_NUMBER: _ClassVar[int]
    OCTAVE_SCALE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    JITTER_FIELD_NUMBER: _ClassVar[int]
    TILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    image: ImageInput
    layers: _containers.RepeatedCompositeFieldContainer[DreamLayer]
    octaves: int
    octave_scale: float
    steps: int
    step_size: float
    jitter: int
    tile_size: int
    max_side: int
    seed: int
    preview_every: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., image: _Optional[_Union[ImageInput, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[DreamLayer, _Mapping]]] = ..., octaves: _Optional[int] = ..., octave_scale: _Optional[float] = ..., steps: _Optional[int] = ..., step_size: _Optional[float] = ..., jitter: _Optional[int] = ..., tile_size: _Optional[int] = ..., max_side: _Optional[int] = ..., seed: _Optional[int] = ..., preview_every: _Optional[int] = ...) -> None: ...

class GradientProgress(_message.Message):
    __slots__ = ("step", "total_steps", "octave", "losses", "preview_png")
    class LossesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    OCTAVE_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_PNG_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    octave: int
    losses: _containers.ScalarMap[str, float]
    preview_png: bytes
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., octave: _Optional[int] = ..., losses: _Optional[_Mapping[str, float]] = ..., preview_png: _Optional[bytes] = ...) -> None: ...

class DreamResult(_message.Message):
    __slots__ = ("model", "version", "png", "width", "height", "steps", "objective_before", "objective_after", "layers", "seconds", "untrained")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_AFTER_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    png: bytes
    width: int
    height: int
    steps: int
    objective_before: float
    objective_after: float
    layers: _containers.RepeatedCompositeFieldContainer[DreamLayer]
    seconds: float
    untrained: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., png: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., objective_before: _Optional[float] = ..., objective_after: _Optional[float] = ..., layers: _Optional[_Iterable[_Union[DreamLayer, _Mapping]]] = ..., seconds: _Optional[float] = ..., untrained: bool = ...) -> None: ...

class DreamResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: GradientProgress
    result: DreamResult
    def __init__(self, progress: _Optional[_Union[GradientProgress, _Mapping]] = ..., result: _Optional[_Union[DreamResult, _Mapping]] = ...) -> None: ...

class StyleImage(_message.Message):
    __slots__ = ("image", "weight")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    image: ImageInput
    weight: float
    def __init__(self, image: _Optional[_Union[ImageInput, _Mapping]] = ..., weight: _Optional[float] = ...) -> None: ...

class StylizeRequest(_message.Message):
    __slots__ = ("model", "version", "content", "styles", "content_weight", "style_weight", "tv_weight", "iterations", "optimizer", "learning_rate", "style_scale", "original_colors", "max_side", "init", "seed", "preview_every")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    STYLES_FIELD_NUMBER: _ClassVar[int]
    CONTENT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STYLE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TV_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    STYLE_SCALE_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_COLORS_FIELD_NUMBER: _ClassVar[int]
    MAX_SIDE_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    content: ImageInput
    styles: _containers.RepeatedCompositeFieldContainer[StyleImage]
    content_weight: float
    style_weight: float
    tv_weight: float
    iterations: int
    optimizer: StyleOptimizer
    learning_rate: float
    style_scale: float
    original_colors: bool
    max_side: int
    init: StyleInit
    seed: int
    preview_every: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., content: _Optional[_Union[ImageInput, _Mapping]] = ..., styles: _Optional[_Iterable[_Union[StyleImage, _Mapping]]] = ..., content_weight: _Optional[float] = ..., style_weight: _Optional[float] = ..., tv_weight: _Optional[float] = ..., iterations: _Optional[int] = ..., optimizer: _Optional[_Union[StyleOptimizer, str]] = ..., learning_rate: _Optional[float] = ..., style_scale: _Optional[float] = ..., original_colors: bool = ..., max_side: _Optional[int] = ..., init: _Optional[_Union[StyleInit, str]] = ..., seed: _Optional[int] = ..., preview_every: _Optional[int] = ...) -> None: ...

class StylizeResult(_message.Message):
    __slots__ = ("model", "version", "png", "width", "height", "iterations", "best_iteration", "losses", "initial_losses", "seconds", "untrained")
    class LossesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class InitialLossesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    BEST_ITERATION_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    INITIAL_LOSSES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    png: bytes
    width: int
    height: int
    iterations: int
    best_iteration: int
    losses: _containers.ScalarMap[str, float]
    initial_losses: _containers.ScalarMap[str, float]
    seconds: float
    untrained: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., png: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., iterations: _Optional[int] = ..., best_iteration: _Optional[int] = ..., losses: _Optional[_Mapping[str, float]] = ..., initial_losses: _Optional[_Mapping[str, float]] = ..., seconds: _Optional[float] = ..., untrained: bool = ...) -> None: ...

class StylizeResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: GradientProgress
    result: StylizeResult
    def __init__(self, progress: _Optional[_Union[GradientProgress, _Mapping]] = ..., result: _Optional[_Union[StylizeResult, _Mapping]] = ...) -> None: ...

class FeatureMapsRequest(_message.Message):
    __slots__ = ("model", "version", "image", "layers", "max_channels")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    image: ImageInput
    layers: _containers.RepeatedScalarFieldContainer[str]
    max_channels: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., image: _Optional[_Union[ImageInput, _Mapping]] = ..., layers: _Optional[_Iterable[str]] = ..., max_channels: _Optional[int] = ...) -> None: ...

class FeatureMap(_message.Message):
    __slots__ = ("layer", "activations", "png", "channels")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    layer: str
    activations: Tensor
    png: bytes
    channels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[str] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., png: _Optional[bytes] = ..., channels: _Optional[_Iterable[int]] = ...) -> None: ...

class FeatureMapsResponse(_message.Message):
    __slots__ = ("model", "version", "maps", "predicted", "seconds", "untrained")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    maps: _containers.RepeatedCompositeFieldContainer[FeatureMap]
    predicted: ClassScore
    seconds: float
    untrained: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., maps: _Optional[_Iterable[_Union[FeatureMap, _Mapping]]] = ..., predicted: _Optional[_Union[ClassScore, _Mapping]] = ..., seconds: _Optional[float] = ..., untrained: bool = ...) -> None: ...

class FiltersRequest(_message.Message):
    __slots__ = ("model", "version", "layer")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    layer: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., layer: _Optional[str] = ...) -> None: ...

class FiltersResponse(_message.Message):
    __slots__ = ("model", "version", "layer", "weights", "png", "seconds", "untrained")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    UNTRAINED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    layer: str
    weights: Tensor
    png: bytes
    seconds: float
    untrained: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., layer: _Optional[str] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., png: _Optional[bytes] = ..., seconds: _Optional[float] = ..., untrained: bool = ...) -> None: ...
