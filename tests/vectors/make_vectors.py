"""Make the known-answer vectors of format version 1 (``tests/vectors/*.json``).

Run by hand, and only when the on-disk format version changes (a new version gets new
vectors; the committed ones of an existing version are never regenerated)::

    .venv/bin/python tests/vectors/make_vectors.py --force

The vectors follow ``docs/format.md`` directly: layouts, labels and associated data are
written out here from the document, not taken from ``dermfs.format``, ``dermfs.names`` or
``dermfs.metadata``, so ``tests/unit/test_known_answers.py`` checks the library against
the document and not against itself. Only the primitives come from ``dermfs.cryptocore``
(AES-GCM through ``Aead._seal_with_nonce``, the one API that takes a nonce, and AES-SIV).
All keys, ids and nonces are fixed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import struct
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dermfs.cryptocore import Aead, SecretKey, Siv

HERE = Path(__file__).resolve().parent
FORMAT_VERSION = 1
CHUNK_SIZE = 4096

# Fixed inputs. Distinct byte patterns, so that a field taken from the wrong place shows.
VOLUME_KEY = bytes(range(0x00, 0x20))
VOLUME_ID = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
KEK = bytes(range(0xE0, 0x100))
WRAP_NONCE = bytes.fromhex("c0c1c2c3c4c5c6c7c8c9cacb")
GENERATION = 1
FILE_ID = bytes(range(0xA0, 0xB0))
FILE_KEY = bytes(range(0x40, 0x60))
OTHER_FILE_ID = bytes(range(0xB0, 0xC0))
HEADER_NONCE = bytes.fromhex("101112131415161718191a1b")
DIR_ID = bytes.fromhex("d1d2d3d4d5d6d7d8d9dadbdcdddedfd0")
SESSION_ID = bytes.fromhex("5e551015e551015e551015e551015e55")

# Section 3: HKDF labels and subkey sizes.
LABELS = {
    "HEADER": (b"dermfs v1 file header wrapping", 32),
    "NAMES": (b"dermfs v1 file names", 64),
    "SYMLINKS": (b"dermfs v1 symlink targets", 32),
    "XATTR_NAMES": (b"dermfs v1 xattr names", 64),
    "XATTR_VALUES": (b"dermfs v1 xattr values", 32),
    "VOLUME_FILE": (b"dermfs v1 volume file mac", 32),
    "INTENT_LOG": (b"dermfs v1 intent log mac", 32),
    "AUDIT": (b"dermfs v1 audit journal", 32),
}


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def subkey(purpose: str) -> bytes:
    label, length = LABELS[purpose]
    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=VOLUME_ID, info=label)
    return hkdf.derive(VOLUME_KEY)


def aead(key: bytes) -> Aead:
    return Aead(SecretKey(key))


def subkeys() -> dict[str, Any]:
    return {
        "volume_key": VOLUME_KEY.hex(),
        "volume_id": VOLUME_ID.hex(),
        "subkeys": {
            purpose: {"label": label.decode("ascii"), "key": subkey(purpose).hex()}
            for purpose, (label, _length) in LABELS.items()
        },
    }


def header_prefix() -> bytes:
    # Section 4.1: magic, version, flags, key generation, file id.
    return b"DRMF" + struct.pack(">HHI", FORMAT_VERSION, 0, GENERATION) + FILE_ID


def file_header() -> dict[str, Any]:
    prefix = header_prefix()
    wrapped = aead(subkey("HEADER"))._seal_with_nonce(HEADER_NONCE, FILE_KEY, prefix + VOLUME_ID)
    return {
        "volume_key": VOLUME_KEY.hex(),
        "volume_id": VOLUME_ID.hex(),
        "generation": GENERATION,
        "file_id": FILE_ID.hex(),
        "file_key": FILE_KEY.hex(),
        "nonce": HEADER_NONCE.hex(),
        "header": (prefix + wrapped).hex(),
    }


def chunk_aad(chunk_index: int, last: bool) -> bytes:
    # Section 4.2: volume id, file id, chunk index (8), last (1).
    return VOLUME_ID + FILE_ID + struct.pack(">QB", chunk_index, 1 if last else 0)


def chunks() -> dict[str, Any]:
    cases = [
        (
            "index 0, final chunk of a one-chunk file",
            0,
            True,
            b"dermfs known-answer test: the only chunk of a short file",
            bytes.fromhex("202122232425262728292a2b"),
        ),
        (
            "index 1, a full chunk that is not the final one",
            1,
            False,
            bytes(index % 251 for index in range(CHUNK_SIZE)),
            bytes.fromhex("303132333435363738393a3b"),
        ),
        (
            "index 0, the empty final chunk of an empty file",
            0,
            True,
            b"",
            bytes.fromhex("404142434445464748494a4b"),
        ),
    ]
    cipher = aead(FILE_KEY)
    return {
        "volume_id": VOLUME_ID.hex(),
        "file_id": FILE_ID.hex(),
        "file_key": FILE_KEY.hex(),
        "chunk_size": CHUNK_SIZE,
        "chunks": [
            {
                "description": description,
                "chunk_index": chunk_index,
                "last": last,
                "nonce": nonce.hex(),
                "plaintext": plaintext.hex(),
                "aad": chunk_aad(chunk_index, last).hex(),
                "sealed": cipher._seal_with_nonce(
                    nonce, plaintext, chunk_aad(chunk_index, last)
                ).hex(),
            }
            for description, chunk_index, last, plaintext, nonce in cases
        ],
    }


def name_entry(name: bytes) -> dict[str, Any]:
    # Section 6: AES-SIV with the parent's id as the one AD item; long names by hash.
    encrypted = Siv(SecretKey(subkey("NAMES"))).encrypt(name, [DIR_ID])
    encoded = b64u(encrypted)
    if len(encoded) <= 255:
        entry, sidecar = encoded, None
    else:
        hashed = b64u(hashlib.sha256(encrypted).digest())
        entry, sidecar = hashed + ".long", hashed + ".name"
    return {
        "name": name.hex(),
        "encrypted": encrypted.hex(),
        "entry": entry,
        "sidecar": sidecar,
    }


def names() -> dict[str, Any]:
    long_name = (b"dermoscopy-series-" * 12)[:196] + b".jpg"
    assert len(long_name) == 200
    return {
        "volume_key": VOLUME_KEY.hex(),
        "volume_id": VOLUME_ID.hex(),
        "dir_id": DIR_ID.hex(),
        "names": [
            name_entry("läsion-0001.jpg".encode()),
            name_entry(long_name),
        ],
    }


def symlink() -> dict[str, Any]:
    # Section 7.
    target = b"../patients/0042/2024-05-17/lesion.jpg"
    nonce = bytes.fromhex("505152535455565758595a5b")
    sealed = aead(subkey("SYMLINKS"))._seal_with_nonce(
        nonce, target, b"dermfs v1 symlink" + VOLUME_ID
    )
    return {
        "volume_key": VOLUME_KEY.hex(),
        "volume_id": VOLUME_ID.hex(),
        "target": target.hex(),
        "nonce": nonce.hex(),
        "backing_target": b64u(sealed),
    }


def xattr() -> dict[str, Any]:
    # Section 7: the name under AD ["xattr"], the value bound to object id and backing name.
    name = b"user.dermfs.comment"
    value = b"benign naevus, follow up in six months"
    nonce = bytes.fromhex("606162636465666768696a6b")
    encrypted_name = Siv(SecretKey(subkey("XATTR_NAMES"))).encrypt(name[5:], [b"xattr"])
    backing_name = b"user." + b64u(encrypted_name).encode("ascii")
    aad = b"dermfs v1 xattr" + VOLUME_ID + FILE_ID + backing_name
    sealed = aead(subkey("XATTR_VALUES"))._seal_with_nonce(nonce, value, aad)
    return {
        "volume_key": VOLUME_KEY.hex(),
        "volume_id": VOLUME_ID.hex(),
        "object_id": FILE_ID.hex(),
        "name": name.hex(),
        "backing_name": backing_name.hex(),
        "value": value.hex(),
        "nonce": nonce.hex(),
        "backing_value": sealed.hex(),
    }


def volume_file() -> dict[str, Any]:
    # Sections 2 and 2.1: a key-file wrap, canonical JSON, HMAC under VOLUME_FILE.
    wrapped = aead(KEK)._seal_with_nonce(
        WRAP_NONCE, VOLUME_KEY, b"dermfs v1 local wrap" + VOLUME_ID
    )
    fields: dict[str, Any] = {
        "dermfs": FORMAT_VERSION,
        "features": ["chunks-aes256gcm", "names-aes-siv", "long-names", "intent-log"],
        "chunk_size": CHUNK_SIZE,
        "volume_id": b64u(VOLUME_ID),
        "keys": [
            {
                "generation": GENERATION,
                "provider": "local",
                "key_name": "keyfile",
                "key_version": 1,
                "wrapped": b64u(wrapped),
                "params": {},
            }
        ],
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    mac = hmac.new(subkey("VOLUME_FILE"), canonical.encode("ascii"), hashlib.sha256).digest()
    document = dict(fields, mac=b64u(mac))
    return {
        "volume_key": VOLUME_KEY.hex(),
        "kek": KEK.hex(),
        "wrap_nonce": WRAP_NONCE.hex(),
        "canonical": canonical,
        "mac": b64u(mac),
        "file": json.dumps(document, indent=2, sort_keys=True) + "\n",
    }


def intent_record(number: int, record_type: int, body: bytes) -> dict[str, Any]:
    # Section 8: length || type || body || HMAC(session id || record number || ...)[:16].
    record = struct.pack(">IB", len(body) + 1, record_type) + body
    tag_input = SESSION_ID + struct.pack(">Q", number) + record
    tag = hmac.new(subkey("INTENT_LOG"), tag_input, hashlib.sha256).digest()[:16]
    return {
        "type": record_type,
        "body": body.hex(),
        "tag": tag.hex(),
        "bytes": (record + tag).hex(),
    }


def intent_log() -> dict[str, Any]:
    inode_a, inode_b = 0x0102030405, 0x0A0B0C0D0E
    saved_chunk = bytes.fromhex(chunks()["chunks"][0]["sealed"])
    path_a = "dermfs-kat/AAAA"
    path_b = "dermfs-kat/BBBB"
    size_a = 88 + len(saved_chunk)
    records = [
        (1, struct.pack(">Q16sQ", inode_a, FILE_ID, size_a) + path_a.encode()),
        (2, struct.pack(">QQ", inode_a, 0) + saved_chunk),
        (1, struct.pack(">Q16sQ", inode_b, OTHER_FILE_ID, 88 + 28) + path_b.encode()),
        (3, struct.pack(">Q", inode_b)),
    ]
    entries = [intent_record(number, kind, body) for number, (kind, body) in enumerate(records)]
    header = b"DRMI" + struct.pack(">HH", FORMAT_VERSION, 0) + SESSION_ID
    return {
        "volume_key": VOLUME_KEY.hex(),
        "volume_id": VOLUME_ID.hex(),
        "session_id": SESSION_ID.hex(),
        "records": entries,
        "log": (header + b"".join(bytes.fromhex(entry["bytes"]) for entry in entries)).hex(),
        "pending": [
            {
                "inode": inode_a,
                "file_id": FILE_ID.hex(),
                "path": path_a,
                "durable_backing_size": size_a,
                "saved": {"0": saved_chunk.hex()},
            }
        ],
    }


VECTORS = {
    "subkeys": subkeys,
    "file_header": file_header,
    "chunks": chunks,
    "names": names,
    "symlink": symlink,
    "xattr": xattr,
    "volume_file": volume_file,
    "intent_log": intent_log,
}


def build(name: str) -> dict[str, Any]:
    """Return the vector document *name*, as it is written to ``<name>.json``."""
    return {"format_version": FORMAT_VERSION, **VECTORS[name]()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="overwrite existing vectors")
    args = parser.parse_args()

    existing = [name for name in VECTORS if (HERE / f"{name}.json").exists()]
    if existing and not args.force:
        print(f"vectors exist ({', '.join(existing)}); pass --force to overwrite", file=sys.stderr)
        return 1
    for name in VECTORS:
        text = json.dumps(build(name), indent=2, ensure_ascii=False) + "\n"
        (HERE / f"{name}.json").write_text(text, encoding="utf-8")
        print(f"wrote {name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
