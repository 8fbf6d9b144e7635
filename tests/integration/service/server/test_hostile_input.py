"""Hostile input against a real server on a centre-crop model: decompression bombs,
images too thin to resize, a fuzzer's mutated payloads. Every call gets a 4xx-class code
(never INTERNAL), none takes more than 5 s, and the server's memory returns to where it
was once the calls are over.
"""

from __future__ import annotations

import http.client
import io
import json
import struct
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.proto_gen.classifier.v1 import classifier_pb2 as pb
from service.proto_gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from tests.integration.service.conftest import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
MODEL = "crop"
CALL_TIMEOUT = 5.0  # "nothing takes over 5 s": a slower call fails as DEADLINE_EXCEEDED
RSS_MARGIN_MB = 100


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return struct.pack(">I", len(body)) + kind + body + crc


def png(width: int, height: int, idat: bytes, colour_type: int = 2) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", idat)
        + _chunk(b"IEND", b"")
    )


def tiny_bomb(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes declaring width × height pixels (and holding none)."""
    return png(width, height, zlib.compress(b"", 9), colour_type=0)


def truncated_bomb(width: int, height: int) -> bytes:
    """A PNG whose compressed data could hold its pixels, with its end cut off: the
    server must really decode most of it (~150 MB at 6300x6300) before finding out."""
    row = bytearray(1 + width * 3)
    row[1::60] = np.random.default_rng(0).integers(0, 255, len(row[1::60]), np.uint8).tobytes()
    data = zlib.compress(bytes(row) * height, 1)
    return png(width, height, data[: len(data) * 9 // 10])


def thin(width: int, height: int) -> bytes:
    """A valid, tiny PNG of a 1-pixel-thin image."""
    rows = (b"\x00" + b"\x80" * width) * height
    return png(width, height, zlib.compress(rows, 9), colour_type=0)


def call(stub: pb_grpc.ImageClassifierStub, *images: pb.Image) -> tuple[grpc.StatusCode, str]:
    try:
        stub.Classify(pb.ClassifyRequest(model=MODEL, images=list(images)), timeout=60)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), str(exc.details())


def reset_peak(server: ServerProcess) -> None:
    """Start the process's peak-RSS (VmHWM) count afresh from its current RSS."""
    Path(f"/proc/{server.pid}/clear_refs").write_text("5")


def peak_rss_mb(server: ServerProcess) -> float:
    for line in Path(f"/proc/{server.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def settled_rss(server: ServerProcess, baseline: float, timeout: float = 20.0) -> float:
    """RSS once it is back within the margin of ``baseline`` (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        rss = server.rss_mb()
        if rss <= baseline + RSS_MARGIN_MB or time.monotonic() > deadline:
            return rss
        time.sleep(0.5)


def warm(server: ServerProcess, stub: pb_grpc.ImageClassifierStub, image: bytes) -> float:
    """Serve some ordinary traffic first, so the baseline RSS includes warm arenas."""
    with ThreadPoolExecutor(8) as pool:
        codes = set(pool.map(lambda _: call(stub, pb.Image(encoded=image))[0], range(64)))
    assert codes == {grpc.StatusCode.OK}
    time.sleep(1)
    reset_peak(server)
    return server.rss_mb()


@pytest.fixture(scope="module")
def crop_server(crop_model: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(crop_model)
    server.wait_for_event("serving")
    yield server
    server.kill()


def photo(quick_model: dict[str, Path]) -> bytes:
    return next((quick_model["data"] / "val").rglob("*.jpg")).read_bytes()


def test_bombs_and_thin_images_get_4xx_codes_and_memory_returns(
    crop_server: ServerProcess, quick_model: dict[str, Path]
) -> None:
    with grpc.insecure_channel(crop_server.target) as channel:
        stub = pb_grpc.ImageClassifierStub(channel)
        baseline = warm(crop_server, stub, photo(quick_model))
        bomb, cut = tiny_bomb(6300, 6300), truncated_bomb(6300, 6300)
        assert len(bomb) < 100
        with ThreadPoolExecutor(8) as pool:
            tiny = list(pool.map(lambda _: call(stub, pb.Image(encoded=bomb)), range(300)))
            truncated = list(pool.map(lambda _: call(stub, pb.Image(encoded=cut)), range(24)))
        thin_codes: dict[object, tuple[grpc.StatusCode, str]] = {
            size: call(stub, pb.Image(encoded=thin(*size)))
            for size in ((1, 40000), (40000, 1), (4_000_000, 1), (39_000_000, 1))
        }
        raw_thin = call(stub, pb.Image(raw=pb.RawImage(height=1, width=40000, rgb=b"\0" * 120000)))
        peak = peak_rss_mb(crop_server)
        final = settled_rss(crop_server, baseline)

    assert Counter(code for code, _ in tiny) == {grpc.StatusCode.INVALID_ARGUMENT: 300}
    assert "cannot hold" in tiny[0][1]  # refused from the header, nothing allocated
    assert Counter(code for code, _ in truncated) == {grpc.StatusCode.INVALID_ARGUMENT: 24}
    assert "truncated" in truncated[0][1]
    for size, (code, message) in {**thin_codes, "raw": raw_thin}.items():
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (size, code, message)
        assert "max_image_aspect_ratio" in message, message
    assert final <= baseline + RSS_MARGIN_MB, (baseline, peak, final)
    with crop_server.client() as client:
        assert client.health() == "SERVING"
    print(
        "\nbombs: "
        + json.dumps(
            {"baseline_mb": round(baseline), "peak_mb": round(peak), "final_mb": round(final)}
        )
    )


def test_decode_budget_bounds_concurrent_decoding(
    start_server: type[ServerProcess], crop_model: Path, quick_model: dict[str, Path]
) -> None:
    # Room for one 6300x6300 decode at a time (~160 MB); without the budget the four
    # decode threads of this machine would hold four at once.
    server = start_server(crop_model, "--max-decode-pixels", "40000000")
    server.wait_for_event("serving")
    cut = truncated_bomb(6300, 6300)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ImageClassifierStub(channel)
        baseline = warm(server, stub, photo(quick_model))
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: call(stub, pb.Image(encoded=cut))[0], range(16)))
        peak = peak_rss_mb(server)
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}  # all waited their turn
    assert peak - baseline < 350, (baseline, peak)  # one decode (+ requests), not four


# --- the fuzzer ----------------------------------------------------------------------


def _seed_image() -> Image.Image:
    rng = np.random.default_rng(7)
    x = np.linspace(0, 255, 96, dtype=np.uint8)[None, :].repeat(72, 0)
    noise = rng.integers(0, 60, (72, 96), dtype=np.uint8)
    return Image.fromarray(np.stack([x, x[::-1] // 2 + noise, noise * 3], axis=2))


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _seeds() -> dict[str, bytes]:
    image = _seed_image()
    exif = Image.Exif()
    exif[0x0112] = 6
    palette = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    frames = [image, image.rotate(90), image.rotate(180)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    return {
        "jpeg": _encode(image, "JPEG", quality=80),
        "jpeg-progressive-exif": _encode(image, "JPEG", progressive=True, exif=exif.tobytes()),
        "png": _encode(image, "PNG"),
        "png-interlaced-palette": _encode(palette, "PNG", interlace=1, transparency=0),
        "png-16bit": _encode(
            Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257), "PNG"
        ),
        "png-rgba": _encode(image.convert("RGBA"), "PNG"),
        "webp": _encode(image, "WEBP", quality=70),
        "webp-lossless": _encode(image, "WEBP", lossless=True),
        "gif-animated": gif.getvalue(),
        "bmp": _encode(image, "BMP"),
        "tiff": _encode(image, "TIFF", compression="tiff_lzw"),
    }


SEEDS = _seeds()


def _set_dims(data: bytearray, width: int, height: int) -> None:
    """Overwrite the declared size in the header, where the format keeps it."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 33:
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    elif data[:2] == b"\xff\xd8":
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            at = data.find(marker)
            if at >= 0 and at + 9 <= len(data):
                data[at + 5 : at + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    elif data[:3] == b"GIF" and len(data) >= 10:
        data[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif data[:2] == b"BM" and len(data) >= 26:
        data[18:26] = struct.pack("<ii", width, -height if width % 2 else height)


@st.composite
def encoded_images(draw: st.DrawFn) -> pb.Image:
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 5))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "dims"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "dims":
            side = st.one_of(st.integers(1, 64), st.integers(1, 70000), st.just(0))
            _set_dims(data, draw(side), draw(side))
    return pb.Image(encoded=bytes(data))


@st.composite
def raw_images(draw: st.DrawFn) -> pb.Image:
    height = draw(st.one_of(st.integers(0, 64), st.integers(0, 100_000)))
    width = draw(st.one_of(st.integers(0, 64), st.integers(0, 100_000)))
    if height * width * 3 <= 64 * 64 * 3 and draw(st.booleans()):
        size = height * width * 3  # consistent
    else:
        size = draw(st.integers(0, 2048))  # what it declares and what it carries differ
    return pb.Image(raw=pb.RawImage(height=height, width=width, rgb=bytes(size)))


requests = st.tuples(
    st.lists(st.one_of(encoded_images(), encoded_images(), raw_images()), min_size=1, max_size=3),
    st.booleans(),  # localize (boxes, CAM) instead of classify
    st.booleans(),  # with the heatmap
)

FUZZ_EXAMPLES = 3000


def test_fuzzed_payloads_get_4xx_codes_quickly_and_memory_returns(
    crop_server: ServerProcess, quick_model: dict[str, Path]
) -> None:
    seen: Counter[str] = Counter()
    with grpc.insecure_channel(crop_server.target) as channel:
        stub = pb_grpc.ImageClassifierStub(channel)
        baseline = warm(crop_server, stub, photo(quick_model))

        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            derandomize=True,  # the same payloads on every run: a failure reproduces
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(requests)
        def one_call(request: tuple[list[pb.Image], bool, bool]) -> None:
            images, localize, heatmap = request
            try:
                if localize:
                    stub.Localize(
                        pb.LocalizeRequest(model=MODEL, images=images, include_heatmap=heatmap),
                        timeout=CALL_TIMEOUT,
                    )
                else:
                    stub.Classify(
                        pb.ClassifyRequest(model=MODEL, images=images), timeout=CALL_TIMEOUT
                    )
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
                assert code in ACCEPTABLE, (code, exc.details())
            seen[code.name] += 1

        started = time.monotonic()
        one_call()
        seconds = time.monotonic() - started
    peak = peak_rss_mb(crop_server)
    final = settled_rss(crop_server, baseline)
    assert sum(seen.values()) == FUZZ_EXAMPLES
    assert seen["OK"] > 0 and seen["INVALID_ARGUMENT"] > 0
    assert final <= baseline + RSS_MARGIN_MB, (baseline, peak, final)
    with crop_server.client() as client:
        assert client.health() == "SERVING"
    print(
        "\nfuzz: "
        + json.dumps(
            {
                "calls": sum(seen.values()),
                "codes": dict(seen),
                "seconds": round(seconds, 1),
                "baseline_mb": round(baseline),
                "peak_mb": round(peak),
                "final_mb": round(final),
            }
        )
    )


# --- the REST front door -----------------------------------------------------------------

REST_FUZZ_EXAMPLES = 800
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
DEEP = "<deep>"  # replaced in the serialised body by a value nested this many levels


def _templates(image: bytes) -> list[tuple[dict[str, object], bytes]]:
    """Valid requests of each kind the REST infer route takes (JSON header, binary tail)."""
    import base64

    encoded = base64.b64encode(image).decode()
    uint8 = np.zeros((1, 64, 64, 3), np.uint8)
    return [
        (
            {
                "inputs": [
                    {"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [encoded]}
                ]
            },
            b"",
        ),
        (
            {
                "id": "x",
                "inputs": [
                    {
                        "name": "image",
                        "shape": [1, 64, 64, 3],
                        "datatype": "UINT8",
                        "data": uint8.tolist(),
                    }
                ],
                "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
            },
            b"",
        ),
        (
            {
                "parameters": {"binary_data_output": True, "timeout": 5_000_000},
                "inputs": [
                    {
                        "name": "image_bytes",
                        "shape": [1],
                        "datatype": "BYTES",
                        "parameters": {"binary_data_size": len(image) + 4},
                    }
                ],
            },
            struct.pack("<I", len(image)) + image,
        ),
    ]


def _paths(value: object, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value[:3]):
            out += _paths(child, (*prefix, i))
    return out


def _replace(value: Any, path: tuple[Any, ...], new: object) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    if isinstance(value, list):
        copy = list(value)
        copy[head] = _replace(copy[head], rest, new)
        return copy
    return value


@st.composite
def rest_requests(draw: st.DrawFn, image: bytes) -> tuple[str, bytes, dict[str, str]]:
    header, binary = draw(st.sampled_from(_templates(image)))
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(_paths(header)))
        new = draw(st.one_of(JSON_VALUES, st.just(DEEP)))
        header = _replace(header, where, new)
    text = json.dumps(header)
    if DEEP in text:
        depth = draw(st.sampled_from([33, 200, 3000, 100_000]))
        text = text.replace(json.dumps(DEEP), "[" * depth + "1" + "]" * depth, 1)
    body = text.encode() + binary
    headers = {"content-type": "application/json"}
    length = draw(
        st.one_of(
            st.none(),
            st.just(str(len(text.encode()))),
            st.sampled_from(["-1", "abc", "", "99999999999", " 12", "1e3"]),
            st.integers(0, len(body) + 10).map(str),
        )
    )
    if length is not None:
        headers["Inference-Header-Content-Length"] = length
    if draw(st.integers(0, 9)) == 0:  # a truncated or bit-flipped body
        cut = draw(st.integers(0, len(body)))
        body = body[:cut]
    version = draw(st.sampled_from(["", "1", "0", "-1", "99", "x", "1.5"]))
    path = f"/v2/models/{MODEL}" + (f"/versions/{version}" if version else "") + "/infer"
    return path, body, headers


def rest_post(
    connection: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, bytes]:
    connection.request("POST", path, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, response.read()


def test_deeply_nested_json_is_refused_with_400_naming_the_limit(
    crop_server: ServerProcess,
) -> None:
    connection = http.client.HTTPConnection(crop_server.http_target, timeout=CALL_TIMEOUT)
    nested = "[" * 3000 + "1" + "]" * 3000
    data = (
        '{"inputs": [{"name": "image", "shape": [1, 64, 64, 3], "datatype": "UINT8", "data": %s}]}'
    )
    cases = {
        "data nested 3,000 deep": (data % nested).encode(),
        "a body nested 100,000 deep": ("[" * 100_000 + "]" * 100_000).encode(),
        "an object nested 40 deep": ('{"a":' * 40 + "1" + "}" * 40).encode(),
    }
    for what, body in cases.items():
        status, answer = rest_post(connection, f"/v2/models/{MODEL}/infer", body, {})
        assert status == 400, (what, status, answer[:200])
        assert b"max_json_depth" in answer, (what, answer[:200])
    status, answer = rest_post(
        connection, "/v2/repository/index", ("[" * 50_000 + "]" * 50_000).encode(), {}
    )
    assert status == 400 and b"max_json_depth" in answer
    connection.close()


def test_fuzzed_rest_requests_get_4xx_codes_and_never_500(
    crop_server: ServerProcess, quick_model: dict[str, Path]
) -> None:
    image = photo(quick_model)
    seen: Counter[int] = Counter()
    connection = http.client.HTTPConnection(crop_server.http_target, timeout=CALL_TIMEOUT)

    @settings(
        max_examples=REST_FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(rest_requests(image))
    def one_call(request: tuple[str, bytes, dict[str, str]]) -> None:
        path, body, headers = request
        status, answer = rest_post(connection, path, body, headers)
        assert status < 500, (status, answer[:300], path, headers, body[:300])
        if status >= 400:
            assert b"error" in answer
        seen[status] += 1

    one_call()
    connection.close()
    assert sum(seen.values()) == REST_FUZZ_EXAMPLES
    assert seen[200] > 0 and seen[400] > 0, seen
    with crop_server.client() as client:
        assert client.health() == "SERVING"
    print("\nrest fuzz: " + json.dumps({str(k): v for k, v in sorted(seen.items())}))
