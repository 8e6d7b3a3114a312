"""Write the mxnet-made golden RecordIO files that ``tests/unit/test_mxnet_golden.py`` checks against.

Run with mxnet 1.9.1 (kept out of the project's environment on purpose):

    python3 -m venv /tmp/mxvenv
    /tmp/mxvenv/bin/pip install mxnet==1.9.1 'numpy<1.24' 'opencv-python-headless<4.9'
    /tmp/mxvenv/bin/python tests/golden/make_golden.py

Each ``NAME.rec``/``NAME.idx`` pair is written by ``mx.recordio.MXIndexedRecordIO``;
``expected.json`` records what mxnet reads back from each (key, offset, header fields,
payload length and SHA-256), ``pixels.npy`` the source images and ``decoded.npy``
what ``mx.image.imdecode`` makes of the encoded ones.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import mxnet as mx
import numpy as np
from mxnet import recordio

OUT = Path(__file__).resolve().parent
MAGIC = struct.pack("<I", 0xCED7230A)


def source_images() -> np.ndarray:
    """Four 16x16 RGB images: smooth gradients (JPEG-friendly) with a per-image offset."""
    y, x = np.mgrid[0:16, 0:16]
    images = [np.stack([x * 10 + 30 * i, y * 15, np.full_like(x, 60 * i)], axis=-1) for i in range(4)]
    return np.stack(images).astype(np.uint8)


def write(name: str, records: dict[int, bytes]) -> None:
    writer = recordio.MXIndexedRecordIO(str(OUT / f"{name}.idx"), str(OUT / f"{name}.rec"), "w")
    for key, record in records.items():
        writer.write_idx(key, record)
    writer.close()


def read_back(name: str) -> list[dict[str, object]]:
    """What mxnet reads from ``name``: per key, its offset, header and payload digest."""
    reader = recordio.MXIndexedRecordIO(str(OUT / f"{name}.idx"), str(OUT / f"{name}.rec"), "r")
    rows = []
    for key in reader.keys:
        record = reader.read_idx(key)
        row: dict[str, object] = {
            "key": int(key),
            "offset": int(reader.idx[key]),
            "record_length": len(record),
            "record_sha256": hashlib.sha256(record).hexdigest(),
        }
        if len(record) >= 24:  # shorter records carry no IRHeader
            header, payload = recordio.unpack(record)
            label = header.label.tolist() if isinstance(header.label, np.ndarray) else float(header.label)
            row |= {"flag": int(header.flag), "label": label, "id": int(header.id), "id2": int(header.id2),
                    "payload_length": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest()}  # fmt: skip
        rows.append(row)
    reader.close()
    return rows


def main() -> None:
    pixels = source_images()
    bgr = pixels[..., ::-1]  # pack_img takes OpenCV's BGR order

    write(
        "single",
        {key: recordio.pack(recordio.IRHeader(0, float(key % 3), key, 0), b"img" * key + b"x" * (key % 4))
         for key in range(5)},
    )  # fmt: skip
    write(
        "multi",
        {key: recordio.pack(recordio.IRHeader(0, [float(key), 0.5, -2.25], key, 7), b"payload%d" % key)
         for key in (3, 1, 2)},
    )  # fmt: skip
    # insightface: record 0 (first identity key 5, end key 7), images 1..4 of 2 identities, identity records 5, 6.
    insightface = {0: recordio.pack(recordio.IRHeader(0, [5.0, 7.0], 0, 0), b"")}
    for key, label in zip(range(1, 5), (0, 0, 0, 1), strict=True):
        image_format = ".png" if key == 4 else ".jpg"
        header = recordio.IRHeader(0, float(label), key, 0)
        insightface[key] = recordio.pack_img(header, bgr[key - 1], quality=95, img_fmt=image_format)
    insightface[5] = recordio.pack(recordio.IRHeader(0, [1.0, 4.0], 0, 0), b"")
    insightface[6] = recordio.pack(recordio.IRHeader(0, [4.0, 5.0], 0, 0), b"")
    write("insightface", insightface)
    # Split records: aligned magics (record offsets 24, 32, 36) split; the one at 42 is unaligned.
    split_payload = MAGIC + b"abcd" + MAGIC + MAGIC + b"qr" + MAGIC + b"s"
    write(
        "split",
        {
            0: recordio.pack(recordio.IRHeader(0, 1.0, 0, 0), split_payload),
            1: MAGIC,
            2: recordio.pack(recordio.IRHeader(0, 2.0, 2, 0), b"tail" + MAGIC * 3),
        },
    )

    expected = {name: read_back(name) for name in ("single", "multi", "insightface", "split")}
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    np.save(OUT / "pixels.npy", pixels)
    reader = recordio.MXIndexedRecordIO(str(OUT / "insightface.idx"), str(OUT / "insightface.rec"), "r")
    decoded = [mx.image.imdecode(recordio.unpack(reader.read_idx(key))[1]).asnumpy() for key in range(1, 5)]
    np.save(OUT / "decoded.npy", np.stack(decoded))
    print(f"wrote golden files to {OUT} with mxnet {mx.__version__}")


if __name__ == "__main__":
    main()
