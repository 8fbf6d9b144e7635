"""ONNX Runtime sessions for a model (with ``sessions``, which makes them, and
``device_resize``, the only other ONNX Runtime users in service/): IO binding, warm-up.

A ``Runner`` holds one model version: its ModelSpec (read from the file's metadata) and
``instances`` ONNX Runtime sessions. Each ``run`` borrows one session, so ``instances``
batches can execute at once (Triton's instance_group); on a CPU the intra-op threads are
split between them.

Providers come from configuration. The default preference is TensorRT, then CUDA, then
CPU, filtered to what this onnxruntime build offers; one that cannot start is logged and
the next is tried, and what runs is listed by ``ListModels``. TensorRT gets an explicit
optimisation profile (batch 1 to the largest the batcher forms), engine and timing caches
that survive restarts, and FP16 only where the model's FP16 gate passed at export or it is
asked for. CUDA gets a memory arena that grows by what is asked (not by powers of two with
each new batch size) and the convolution algorithm search that is configured. On a GPU,
IO binding copies the input batch to the device once and each output back once.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.model.cores import cpu_count
from service.model.device_resize import DeviceResize
from service.model.errors import InferenceError
from service.model.gpu_decode import DevicePreprocessor, DeviceRow
from service.model.runner_options import CPU, CUDA, TENSORRT, RunnerOptions
from service.model.sessions import OPT_LEVELS, bare_session, provider_options, select_providers
from service.model.spec import ModelSpec

log = logging.getLogger(__name__)


# Below this single-thread cost per image a model leaves the other cores to decoding.
LIGHT_MODEL_MS = 2.0


BatchItem = np.ndarray | DeviceRow  # one image of a batch: host pixels or a device row


class Runner:
    """One model version in ONNX Runtime. Thread-safe: ``run`` may be called concurrently."""

    spec: ModelSpec
    max_batch_size: int | None  # the graph's fixed batch size, None when dynamic

    def __init__(self, path: Path, options: RunnerOptions | None = None):
        self.path = Path(path)
        self.options = options or RunnerOptions()
        if not self.path.is_file():
            raise FileNotFoundError(f"model file {self.path} does not exist")
        self.providers = select_providers(self.options.providers)
        self._sessions: queue.Queue[ort.InferenceSession] = queue.Queue()
        cores = self.options.cores or cpu_count()
        per_instance = max(1, cores // max(1, self.options.instances))
        auto = self.options.intra_op_threads == 0
        self.intra_op_threads = 1 if auto else self.options.intra_op_threads
        # The GPU providers' options depend on the spec (input name and size, FP16 gate)
        # and on whether the batch is dynamic: read both from a cheap CPU session first.
        # The CPU provider needs neither, so a CPU-only runner reads them from its session.
        cpu_only = self.providers == [CPU]
        if not cpu_only:
            self._read_spec(bare_session(self.path))
        first = self._new_session(0)
        if cpu_only:
            self._read_spec(first)
        self._check_io(first)
        if auto and per_instance > 1:
            self.intra_op_threads = self._choose_threads(first, per_instance)
            if self.intra_op_threads != 1:
                first = self._new_session(0)
        self._sessions.put(first)
        for i in range(1, max(1, self.options.instances)):
            self._sessions.put(self._new_session(i))
        self.active_providers = first.get_providers()
        self.on_gpu = self.active_providers[0] in (TENSORRT, CUDA)
        self._device = "cuda" if self.on_gpu else "cpu"
        self._device_id = self.options.device_id if self.on_gpu else 0
        binding = self.options.io_binding
        self._use_io_binding = self.on_gpu if binding is None else binding
        # GPU decoding, when the server turns it on (service.model.gpu_decode).
        self.device_preprocessor: DevicePreprocessor | None = None
        self._copy_stream: int | None = None  # batch assembly from device rows (GPU)
        self._stream_lock = threading.Lock()
        self.output_names = [o.name for o in first.get_outputs()]
        self.output_shapes = {o.name: list(o.shape) for o in first.get_outputs()}
        log.info(
            "loaded %s: providers %s (wanted %s), %d instance(s), io_binding=%s",
            self.path,
            self.active_providers,
            list(self.options.providers),
            self.options.instances,
            self._use_io_binding,
        )

    # --- construction ---------------------------------------------------------------

    def _session_options(self, instance: int) -> ort.SessionOptions:
        opts = self.options
        so = ort.SessionOptions()
        if opts.graph_optimization not in OPT_LEVELS:
            raise ValueError(
                f"graph_optimization must be one of {', '.join(OPT_LEVELS)}, "
                f"not {opts.graph_optimization!r}"
            )
        so.graph_optimization_level = OPT_LEVELS[opts.graph_optimization]
        so.intra_op_num_threads = self.intra_op_threads
        so.inter_op_num_threads = opts.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        spin = "1" if opts.allow_spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        for key, value in opts.extra_session_config.items():
            so.add_session_config_entry(key, value)
        only_cpu = self.providers == [CPU]
        if opts.optimized_model_dir is not None and only_cpu and instance == 0:
            # An optimized graph saved with GPU providers may hold device-specific nodes,
            # so the cache is written for CPU-only sessions.
            opts.optimized_model_dir.mkdir(parents=True, exist_ok=True)
            so.optimized_model_filepath = str(
                opts.optimized_model_dir / f"{self.path.parent.parent.name}-"
                f"{self.path.parent.name}-{opts.graph_optimization}.onnx"
            )
        return so

    def _read_spec(self, session: ort.InferenceSession) -> None:
        self.spec = ModelSpec.from_metadata(
            dict(session.get_modelmeta().custom_metadata_map), source=str(self.path)
        )
        self.max_batch_size = self._declared_batch(session)

    def _provider_options(self) -> list[tuple[str, dict[str, str]]]:
        # CPU needs no options, and a CPU-only runner has no spec yet when it asks.
        return [
            (
                p,
                {}
                if p == CPU
                else provider_options(p, self.options, self.spec, self.max_batch_size),
            )
            for p in self.providers
        ]

    def _new_session(self, instance: int) -> ort.InferenceSession:
        while True:
            try:
                return ort.InferenceSession(
                    str(self.path),
                    self._session_options(instance),
                    providers=self._provider_options(),
                )
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
                # A GPU provider compiled into this build but unable to start here (no
                # TensorRT libraries, no device) must not take the model down: step back.
                gpu = [p for p in self.providers if p in (TENSORRT, CUDA)]
                if not gpu:
                    raise ValueError(f"cannot load {self.path} into ONNX Runtime: {exc}") from exc
                log.warning(
                    "%s failed for %s (%s); falling back to %s",
                    gpu[0],
                    self.path,
                    exc,
                    [p for p in self.providers if p != gpu[0]],
                )
                self.providers = [p for p in self.providers if p != gpu[0]]

    def _check_io(self, session: ort.InferenceSession) -> None:
        """The graph must match its ModelSpec; a mismatch means a broken export."""
        spec = self.spec
        inputs = session.get_inputs()
        problems = []
        if len(inputs) != 1 or inputs[0].name != spec.input.name:
            problems.append(f"expected one input named {spec.input.name!r}")
        else:
            shape = inputs[0].shape
            if inputs[0].type != "tensor(uint8)":
                problems.append(f"input type {inputs[0].type}, expected tensor(uint8)")
            if list(shape[1:]) != [spec.input.height, spec.input.width, 3]:
                problems.append(
                    f"input shape {shape}, expected [batch, "
                    f"{spec.input.height}, {spec.input.width}, 3]"
                )
        names = {o.name for o in session.get_outputs()}
        wanted = [
            spec.outputs.probabilities,
            spec.outputs.boxes,
            spec.outputs.cam,
            spec.outputs.cam_classes,
        ]
        missing = [n for n in wanted if n is not None and n not in names]
        if missing:
            problems.append(f"outputs {missing} named in the ModelSpec are not in the graph")
        if problems:
            raise ValueError(
                f"{self.path}: graph does not match its ModelSpec: " + "; ".join(problems)
            )

    def _choose_threads(self, probe: ort.InferenceSession, per_instance: int) -> int:
        """Auto threads: one for a light model, every core of the instance for a heavy one.

        On a CPU the same cores decode images. A light network (a few hundred µs per image
        on one thread) runs best on one thread, leaving the rest to decoding; a heavy one
        (tens of ms) needs them all. The probe times a batch of 8 on one thread.
        """
        if self.providers != [CPU]:
            return per_instance
        batch = np.zeros((8, self.spec.input.height, self.spec.input.width, 3), np.uint8)
        feed = {self.spec.input.name: batch}
        probe.run(None, feed)
        started = time.perf_counter()
        for _ in range(3):
            probe.run(None, feed)
        per_image_ms = (time.perf_counter() - started) / 24 * 1000
        threads = 1 if per_image_ms < LIGHT_MODEL_MS else per_instance
        log.info(
            "%s: %.2f ms per image on one thread -> %d intra-op thread(s)",
            self.path,
            per_image_ms,
            threads,
        )
        return threads

    @staticmethod
    def _declared_batch(session: ort.InferenceSession) -> int | None:
        dim = session.get_inputs()[0].shape[0]
        return dim if isinstance(dim, int) else None

    # --- execution ------------------------------------------------------------------

    @contextmanager
    def _session(self) -> Iterator[ort.InferenceSession]:
        session = self._sessions.get()
        try:
            yield session
        finally:
            self._sessions.put(session)

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [N, H, W, 3] → {output name: array with N rows}."""
        spec = self.spec
        expected = (spec.input.height, spec.input.width, 3)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise InferenceError(
                f"batch must be uint8 [N, {expected[0]}, {expected[1]}, 3], got "
                f"{images.dtype} {list(images.shape)}"
            )
        try:
            with self._session() as session:
                if self._use_io_binding:
                    outputs = self._run_bound(session, images)
                else:
                    values = session.run(None, {spec.input.name: images})
                    outputs = dict(zip(self.output_names, values, strict=True))
        except InferenceError:
            raise
        except Exception as exc:
            raise InferenceError(f"ONNX Runtime failed on a batch of {len(images)}: {exc}") from exc
        return self._checked_rows(outputs, len(images))

    @staticmethod
    def _checked_rows(outputs: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
        for name, value in outputs.items():
            if len(value) != count:
                raise InferenceError(f"output {name!r} has {len(value)} rows for {count} images")
        return outputs

    def device_resize(self) -> DeviceResize:
        """The resize session for GPU decoding, on this runner's device and providers."""
        return DeviceResize(self.spec, self._device, self._device_id, self.providers)

    def run_items(self, items: Sequence[BatchItem]) -> dict[str, np.ndarray]:
        """A batch of host images and rows already on the device (GPU decoding), in order.

        Host images only: stacked and run as ``run`` does. With device rows, the batch is
        assembled in the runner's memory: device rows copied device to device, host images
        copied up, one row each; then the model reads it in place."""
        if not any(isinstance(item, DeviceRow) for item in items):
            return self.run(np.stack(items))  # type: ignore[arg-type]
        spec = self.spec
        row_bytes = spec.input.height * spec.input.width * 3
        shape = [len(items), spec.input.height, spec.input.width, 3]
        try:
            batch = ort.OrtValue.ortvalue_from_shape_and_type(
                shape, np.uint8, self._device, self._device_id
            )
            base = int(batch.data_ptr())
            hosts = []  # host images stay referenced until their copies are done
            copy = self._copier()
            for k, item in enumerate(items):
                if isinstance(item, DeviceRow):
                    copy(base + k * row_bytes, item.pointer, row_bytes, False)
                else:
                    host = np.ascontiguousarray(item, dtype=np.uint8)
                    if host.shape != tuple(shape[1:]):
                        raise InferenceError(f"image {k} has shape {list(host.shape)}")
                    hosts.append(host)
                    copy(base + k * row_bytes, host.ctypes.data, row_bytes, True)
            self._copies_done()
            with self._session() as session:
                outputs = self._run_bound_value(session, batch)
        except InferenceError:
            raise
        except Exception as exc:
            raise InferenceError(f"ONNX Runtime failed on a batch of {len(items)}: {exc}") from exc
        return self._checked_rows(outputs, len(items))

    def _copier(self) -> Any:
        """copy(dst, src, bytes, from_host) into this runner's memory."""
        if not self.on_gpu:

            def host_copy(dst: int, src: int, count: int, _from_host: bool) -> None:
                ctypes.memmove(dst, src, count)

            return host_copy
        from service.model.cuda import CudaRuntime

        cuda = CudaRuntime.get()
        with self._stream_lock:
            if self._copy_stream is None:
                cuda.set_device(self._device_id)
                self._copy_stream = cuda.stream_create()
        stream = self._copy_stream

        def device_copy(dst: int, src: int, count: int, from_host: bool) -> None:
            cuda.copy_async(dst, src, count, stream, from_host)

        return device_copy

    def _copies_done(self) -> None:
        if self.on_gpu and self._copy_stream is not None:
            from service.model.cuda import CudaRuntime

            CudaRuntime.get().stream_synchronize(self._copy_stream)

    def _run_bound(
        self, session: ort.InferenceSession, images: np.ndarray
    ) -> dict[str, np.ndarray]:
        # One copy of the batch onto the device; the outputs stay there until each is
        # copied back once, by .numpy().
        batch = ort.OrtValue.ortvalue_from_numpy(
            np.ascontiguousarray(images), self._device, self._device_id
        )
        return self._run_bound_value(session, batch)

    def _run_bound_value(
        self, session: ort.InferenceSession, batch: ort.OrtValue
    ) -> dict[str, np.ndarray]:
        binding = session.io_binding()
        binding.bind_ortvalue_input(self.spec.input.name, batch)
        for name in self.output_names:
            binding.bind_output(name, self._device, self._device_id)
        session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {name: value.numpy() for name, value in zip(self.output_names, values, strict=True)}

    def warmup_sizes(self, largest: int, preferred: Sequence[int]) -> list[int]:
        """The batch sizes to run before the model is served.

        On a GPU every size the batcher can form: the CUDA provider chooses convolution
        algorithms per input shape, and a size first met live would stall that batch. On
        the CPU nothing is shape-specific beyond the arena, so the ends and the preferred
        sizes are enough.
        """
        if self.on_gpu:
            return list(range(1, largest + 1))
        return sorted({1, largest, *[b for b in preferred if b <= largest]})

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        """Run every session once per batch size, so the first real request is not the
        one that pays for memory arenas, kernel selection or TensorRT engine builds."""
        spec = self.spec
        sessions = [self._sessions.get() for _ in range(self._sessions.qsize())]
        try:
            for session in sessions:
                for n in sorted(set(batch_sizes)):
                    batch = np.zeros((n, spec.input.height, spec.input.width, 3), np.uint8)
                    if self._use_io_binding:
                        self._run_bound(session, batch)
                    else:
                        session.run(None, {spec.input.name: batch})
        finally:
            for session in sessions:
                self._sessions.put(session)
