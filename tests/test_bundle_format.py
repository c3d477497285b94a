"""The signature format of SPEC section 4, byte for byte where it matters."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given
from hypothesis import strategies as st

from signing_service import bundle
from signing_service.manifest import Resource, root_digest, sort_resources

D = hashlib.sha256(b"x").hexdigest()


def test_pae_is_the_dsse_encoding() -> None:
    assert bundle.pae(b"hello", "t/x") == b"DSSEv1 3 t/x 5 hello"
    expected = b"DSSEv1 28 application/vnd.in-toto+json 2 {}"
    assert bundle.pae(b"{}") == expected


def test_resources_sort_by_path_components_like_model_signing() -> None:
    names = ["sub-x", "sub/b", "sub/a", "a", "sub.y", "Z"]
    ordered = [r.name for r in sort_resources([Resource(n, D) for n in names])]
    assert ordered == ["Z", "a", "sub/a", "sub/b", "sub-x", "sub.y"]


def test_root_digest_is_sha256_of_raw_digests_in_order() -> None:
    a, b = hashlib.sha256(b"a").digest(), hashlib.sha256(b"b").digest()
    resources = [Resource("a", a.hex()), Resource("b", b.hex())]
    assert root_digest(resources) == hashlib.sha256(a + b).hexdigest()


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()])
def test_raw_signatures_convert_to_der_and_verify(curve: ec.EllipticCurve) -> None:
    key = ec.generate_private_key(curve)
    der = key.sign(b"data", ec.ECDSA(bundle.curve_hash(key.public_key())))
    raw = bundle.der_to_raw(der, key.public_key())
    assert len(raw) == {256: 64, 384: 96, 521: 132}[curve.key_size]
    assert bundle.raw_to_der(raw, key.public_key()) == der


def test_raw_signature_of_wrong_length_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(bundle.BundleError, match="must be 64 bytes"):
        bundle.raw_to_der(b"\x01" * 63, key.public_key())


def _halves(size: int) -> st.SearchStrategy[bytes]:
    # Leading zero bytes and the top bit are what change the DER: draw them often.
    return st.tuples(
        st.integers(0, 3), st.sampled_from([0x01, 0x7F, 0x80, 0xFF]), st.binary(min_size=size)
    ).map(lambda t: (bytes(t[0]) + bytes((t[1],)) + t[2])[:size])


@pytest.mark.parametrize("size", [32, 48, 66])
def test_raw_to_der_is_byte_for_byte_encode_dss_signature(size: int) -> None:
    @given(r=_halves(size), s=_halves(size))
    def check(r: bytes, s: bytes) -> None:
        expected = encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
        assert bundle.raw_ecdsa_to_der(r + s, size) == expected

    check()
    for r, s in [(bytes(size), bytes(size)), (b"\xff" * size, b"\0" * (size - 1) + b"\x80")]:
        expected = encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
        assert bundle.raw_ecdsa_to_der(r + s, size) == expected


def make_bundle(key: ec.EllipticCurvePrivateKey, statement: dict) -> dict:
    payload = bundle.statement_payload(statement)
    der = key.sign(bundle.pae(payload), ec.ECDSA(hashes.SHA256()))
    return bundle.build_bundle(payload, der, hint=bundle.key_hint(key.public_key()))


def test_bundle_shape_matches_sigstore_v03() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    st_ = bundle.build_statement("m", [Resource("f", D)], ignore_paths=[".git"])
    b = make_bundle(key, st_)
    assert b["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    assert b["verificationMaterial"] == {
        "publicKey": {"hint": bundle.key_hint(key.public_key())},
        "tlogEntries": [],
    }
    assert b["dsseEnvelope"]["payloadType"] == "application/vnd.in-toto+json"
    assert b["dsseEnvelope"]["signatures"][0]["keyid"] == ""
    statement = json.loads(base64.b64decode(b["dsseEnvelope"]["payload"]))
    assert statement["predicate"]["serialization"] == {
        "method": "files", "hash_type": "sha256", "allow_symlinks": False, "ignore_paths": [".git"],
    }  # fmt: skip
    assert statement["subject"] == [
        {"name": "m", "digest": {"sha256": root_digest([Resource("f", D)])}}
    ]


def test_verify_fails_closed_on_tampering() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    good = make_bundle(key, bundle.build_statement("m", [Resource("f", D)]))
    assert bundle.verify_bundle(good, key.public_key()).resources == [Resource("f", D)]

    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(bundle.VerificationError, match="key hint does not match"):
        bundle.verify_bundle(good, other.public_key())

    tampered = json.loads(json.dumps(good))
    statement = json.loads(base64.b64decode(tampered["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"][0]["digest"] = "0" * 64
    tampered["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    with pytest.raises(bundle.VerificationError, match="does not verify"):
        bundle.verify_bundle(tampered, key.public_key())


def test_verify_rejects_an_inconsistent_root_digest() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    statement = bundle.build_statement("m", [Resource("f", D)])
    statement["subject"][0]["digest"]["sha256"] = "0" * 64
    with pytest.raises(bundle.VerificationError, match="manifest is inconsistent"):
        bundle.verify_bundle(make_bundle(key, statement), key.public_key())


@given(st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=20), max_size=5))
def test_statement_payload_is_deterministic(meta: dict[str, str]) -> None:
    a = bundle.build_statement("m", [Resource("f", D)], service_metadata=meta)
    b = bundle.build_statement(
        "m", [Resource("f", D)], service_metadata=dict(reversed(meta.items()))
    )
    assert bundle.statement_payload(a) == bundle.statement_payload(b)


def test_extra_resource_fields_do_not_crash_verification() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    statement = bundle.build_statement("m", [Resource("f", D)])
    statement["predicate"]["resources"][0]["size"] = 12
    verified = bundle.verify_bundle(make_bundle(key, statement), key.public_key())
    assert verified.resources == [Resource("f", D)]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=25,
)


@given(_json_values)
def test_pretty_json_is_exactly_json_dumps_with_indent_2(value: object) -> None:
    assert bundle.pretty_json(value) == json.dumps(value, indent=2)


def test_pretty_json_falls_back_to_json_for_what_it_does_not_handle() -> None:
    odd = {"t": (1, "é"), "nested": {3: [], None: {}}}  # tuples; keys that are not strings
    assert bundle.pretty_json(odd) == json.dumps(odd, indent=2)
    with pytest.raises(TypeError):
        bundle.pretty_json({"x": object()})
    built = bundle.build_bundle(b"{}", b"\x30\x06", certificate_chain_der=[b"leaf", b"ca"])
    assert bundle.bundle_bytes(built) == json.dumps(built, indent=2).encode() + b"\n"
