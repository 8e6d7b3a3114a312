"""MXNet RecordIO (``.rec`` + ``.idx``) read and write, byte-compatible with dmlc-core, without mxnet.

One module per part of the format: ``framing`` (a record's bytes on disk), ``image_header``
(the ``IRHeader`` before an image), ``index`` (the ``.idx`` and its cache), ``reader`` and
``writer`` (keyed access), ``scan`` (reading without the ``.idx``: inspection, recovery,
reindexing) and ``layout`` (insightface's and im2rec's face datasets).
"""

from sface_dist.data.recordio.framing import MAGIC, RecordIOError, frame
from sface_dist.data.recordio.image_header import IRHeader, pack, unpack
from sface_dist.data.recordio.index import read_index
from sface_dist.data.recordio.layout import FaceRecordIndex, FaceRecordWriter, header_record
from sface_dist.data.recordio.reader import RecordIOReader
from sface_dist.data.recordio.scan import (
    ScannedRecord,
    SkippedBytes,
    rebuild_index,
    scan_records,
    scan_resynchronising,
)
from sface_dist.data.recordio.writer import RecordIOWriter

__all__ = [
    "MAGIC",
    "FaceRecordIndex",
    "FaceRecordWriter",
    "IRHeader",
    "RecordIOError",
    "RecordIOReader",
    "RecordIOWriter",
    "ScannedRecord",
    "SkippedBytes",
    "frame",
    "header_record",
    "pack",
    "read_index",
    "rebuild_index",
    "scan_records",
    "scan_resynchronising",
    "unpack",
]
