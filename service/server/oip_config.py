"""Triton's model configuration message (``model_config.proto``, as the ``tritonclient``
wheel ships it) from the data plane's ``ModelConfiguration``: what both Open Inference
Protocol transports answer to a config request (gRPC as the message, REST as its JSON)."""

from __future__ import annotations

from typing import Any

from google.protobuf.json_format import MessageToDict
from tritonclient.grpc import model_config_pb2 as mc

from service.server.domain import ModelConfiguration
from service.server.tensors import TensorInfo

_CONFIG_TYPES = {
    "FP32": mc.TYPE_FP32,
    "INT64": mc.TYPE_INT64,
    "UINT8": mc.TYPE_UINT8,
    "BYTES": mc.TYPE_STRING,
}
# ModelConfig's int64 fields, which protobuf's JSON mapping writes as strings; Triton and
# the clients that read its config (perf_analyzer) expect numbers.
_INT64_FIELDS = {
    "dims",
    "shape",
    "preferred_batch_size",
    "max_queue_delay_microseconds",
    "versions",
    "num_versions",
}


def _config_io(info: TensorInfo, message: Any) -> Any:
    # Triton's convention with max_batch_size > 0: dims leave out the batch dimension;
    # a per-image scalar is dims [1] reshaped to [].
    dims = list(info.shape[1:]) or [1]
    kwargs: dict[str, Any] = {"name": info.name, "data_type": _CONFIG_TYPES[info.datatype]}
    if message is mc.ModelInput:
        kwargs["optional"] = info.optional
    item = message(dims=dims, **kwargs)
    if not info.shape[1:]:
        item.reshape.shape[:] = []
        item.reshape.SetInParent()
    return item


def config_message(config: ModelConfiguration) -> Any:
    message = mc.ModelConfig(
        name=config.name,
        platform=config.platform,
        backend="onnxruntime",
        max_batch_size=config.max_batch_size,
        input=[_config_io(i, mc.ModelInput) for i in config.inputs],
        output=[_config_io(o, mc.ModelOutput) for o in config.outputs],
    )
    message.dynamic_batching.max_queue_delay_microseconds = config.max_queue_delay_us
    message.dynamic_batching.preferred_batch_size.extend(config.preferred_batch_sizes)
    message.instance_group.add(
        count=config.instances,
        kind=mc.ModelInstanceGroup.KIND_GPU if config.on_gpu else mc.ModelInstanceGroup.KIND_CPU,
    )
    policy = message.version_policy
    if config.version_policy == "latest":
        policy.latest.num_versions = 1
    elif config.version_policy == "all":
        policy.all.SetInParent()
    else:
        policy.specific.versions.extend(config.versions)
    return message


def config_json(config: ModelConfiguration) -> Any:
    """The message as Triton's REST API writes it (int64 fields as numbers)."""
    return _int64_fields(MessageToDict(config_message(config), preserving_proto_field_name=True))


def _int64_fields(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _int64_fields(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_int64_fields(v, key) for v in value]
    if key in _INT64_FIELDS and isinstance(value, str):
        return int(value)
    return value
