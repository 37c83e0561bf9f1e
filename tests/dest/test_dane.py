"""DANE TLSA matching (RFC 7672 section 3, RFC 6698 section 2.1, RFC 7671 section 9)."""

from __future__ import annotations

import hashlib

import pytest

from requiretls.dest.dane import (
    DaneOutcome,
    TlsaRecord,
    make_tlsa,
    match_tlsa,
    name_matches,
    usable_records,
)
from requiretls.dest.errors import CertificateParseError

from .support import TestCA


@pytest.mark.parametrize(("selector", "mtype"), [(1, 1), (1, 2), (0, 1), (0, 2), (1, 0), (0, 0)])
def test_dane_ee_matches_leaf_for_every_selector_and_matching_type(ca: TestCA, selector: int, mtype: int) -> None:
    """RFC 6698 section 2.1.2/2.1.3: selector Cert(0)/SPKI(1) x Full(0)/SHA2-256(1)/SHA2-512(2)."""
    leaf = ca.leaf("mx.good.test")
    rec = make_tlsa(leaf.der, 3, selector, mtype)
    result = match_tlsa([rec], [leaf.der], ["mx.good.test"])
    assert result.outcome is DaneOutcome.MATCHED_EE
    assert result.authenticated


def test_dane_ee_ignores_names_and_expiry(ca: TestCA) -> None:
    """RFC 7672 section 3.1.1/3.2.1: DANE-EE(3) authenticates even with wrong names or expired."""
    leaf = ca.leaf("somewhere.else.test", expired=True)
    result = match_tlsa([make_tlsa(leaf.der)], [leaf.der], ["mx.good.test"])
    assert result.authenticated


def test_dane_ee_other_key_does_not_match(ca: TestCA) -> None:
    leaf, other = ca.leaf("mx.good.test"), ca.leaf("mx.good.test")
    result = match_tlsa([make_tlsa(other.der)], [leaf.der], ["mx.good.test"])
    assert result.outcome is DaneOutcome.NO_MATCH
    assert not result.authenticated


def test_dane_ee_matches_only_the_leaf(ca: TestCA) -> None:
    """A 3 x x record that matches an issuer in the chain is not a match (RFC 7672 section 3.1.1)."""
    inter = ca.intermediate()
    leaf = ca.leaf("mx.good.test", issuer=inter)
    result = match_tlsa([make_tlsa(inter.der, 3, 1, 1)], [leaf.der, inter.der], ["mx.good.test"])
    assert not result.authenticated


def test_dane_ta_matches_intermediate_in_chain_with_name_check(ca: TestCA) -> None:
    """RFC 7672 section 3.1.2/3.2.2: DANE-TA(2) record for a CA the server sends; leaf name checked."""
    inter = ca.intermediate()
    leaf = ca.leaf("mx.good.test", issuer=inter)
    rec = make_tlsa(inter.der, 2, 0, 1)
    result = match_tlsa([rec], [leaf.der, inter.der], ["mx.good.test", "good.test"])
    assert result.outcome is DaneOutcome.MATCHED_TA


def test_dane_ta_spki_of_root_matches(ca: TestCA) -> None:
    leaf = ca.leaf("mx.good.test")
    rec = make_tlsa(ca.root.der, 2, 1, 2)
    assert match_tlsa([rec], [leaf.der, ca.root.der], ["mx.good.test"]).authenticated


def test_dane_ta_accepts_next_hop_domain_as_reference_identifier(ca: TestCA) -> None:
    """RFC 7672 section 3.2.2: with a secure MX the next-hop domain is a reference identifier."""
    leaf = ca.leaf("good.test")
    rec = make_tlsa(ca.root.der, 2, 0, 1)
    assert match_tlsa([rec], [leaf.der, ca.root.der], ["mx.good.test", "good.test"]).authenticated


def test_dane_ta_rejects_wrong_name(ca: TestCA) -> None:
    """RFC 7672 section 3.2.2: DANE-TA requires a name check."""
    leaf = ca.leaf("mx.evil.test")
    rec = make_tlsa(ca.root.der, 2, 0, 1)
    result = match_tlsa([rec], [leaf.der, ca.root.der], ["mx.good.test"])
    assert result.outcome is DaneOutcome.NAME_MISMATCH


def test_dane_ta_wildcard_matches_one_label_only(ca: TestCA) -> None:
    """RFC 7672 section 3.2.3: the wildcard is the whole left-most label."""
    leaf = ca.leaf("*.good.test")
    rec = make_tlsa(ca.root.der, 2, 0, 1)
    assert match_tlsa([rec], [leaf.der, ca.root.der], ["mx.good.test"]).authenticated
    assert not match_tlsa([rec], [leaf.der, ca.root.der], ["a.mx.good.test"]).authenticated


def test_dane_ta_uses_cn_only_without_dns_ids(ca: TestCA) -> None:
    leaf = ca._make("mx.good.test", ca.root, ca=False, names=())
    rec = make_tlsa(ca.root.der, 2, 0, 1)
    assert match_tlsa([rec], [leaf.der, ca.root.der], ["mx.good.test"]).authenticated


def test_dane_ta_rejects_expired_leaf(ca: TestCA) -> None:
    leaf = ca.leaf("mx.good.test", expired=True)
    rec = make_tlsa(ca.root.der, 2, 0, 1)
    result = match_tlsa([rec], [leaf.der, ca.root.der], ["mx.good.test"])
    assert result.outcome is DaneOutcome.CHAIN_INVALID


def test_dane_ta_rejects_leaf_not_signed_by_the_anchor(ca: TestCA) -> None:
    """The chain must really lead to the TA: same issuer name, other key, must fail."""
    impostor_ca = TestCA("requiretls test root")
    leaf = impostor_ca.leaf("mx.good.test")
    rec = make_tlsa(ca.root.der, 2, 0, 1)
    result = match_tlsa([rec], [leaf.der, ca.root.der], ["mx.good.test"])
    assert result.outcome is DaneOutcome.CHAIN_INVALID


def test_dane_ta_not_sent_by_server_does_not_match(ca: TestCA) -> None:
    """RFC 7672 section 3.1.2: the server must include the TA certificate in its chain."""
    leaf = ca.leaf("mx.good.test")
    rec = make_tlsa(ca.root.der, 2, 0, 1)
    assert not match_tlsa([rec], [leaf.der], ["mx.good.test"]).authenticated


def test_dane_ta_rejects_non_ca_issuer(ca: TestCA) -> None:
    """A leaf certificate cannot act as an issuer even when its key signed the next one."""
    fake_ca = ca.leaf("not-a-ca.test")
    leaf = ca._make("mx.good.test", fake_ca, ca=False, names=("mx.good.test",))
    rec = make_tlsa(fake_ca.der, 2, 0, 1)
    assert match_tlsa([rec], [leaf.der, fake_ca.der], ["mx.good.test"]).outcome is DaneOutcome.CHAIN_INVALID


def test_pkix_usages_are_unusable(ca: TestCA) -> None:
    """RFC 7672 section 3.1.3: PKIX-TA(0)/PKIX-EE(1) may be treated as unusable; we do."""
    leaf = ca.leaf("mx.good.test")
    recs = [make_tlsa(leaf.der, 1, 1, 1), make_tlsa(ca.root.der, 0, 1, 1)]
    assert usable_records(recs) == ()
    assert match_tlsa(recs, [leaf.der], ["mx.good.test"]).outcome is DaneOutcome.NO_USABLE_RECORDS


def test_unknown_parameters_and_bad_digest_lengths_are_unusable() -> None:
    assert not TlsaRecord(3, 2, 1, b"x" * 32).usable
    assert not TlsaRecord(3, 1, 3, b"x" * 32).usable
    assert not TlsaRecord(3, 1, 1, b"x" * 31).usable
    assert not TlsaRecord(4, 1, 1, b"x" * 32).usable
    assert TlsaRecord(3, 1, 1, b"x" * 32).usable


def test_digest_agility_uses_only_the_strongest_digest(ca: TestCA) -> None:
    """RFC 7671 section 9: with SHA2-512 records present, a matching SHA2-256 record is not used."""
    leaf, other = ca.leaf("mx.good.test"), ca.leaf("mx.good.test")
    sha256_match = make_tlsa(leaf.der, 3, 1, 1)
    sha512_other = make_tlsa(other.der, 3, 1, 2)
    assert usable_records([sha256_match, sha512_other]) == (sha512_other,)
    assert not match_tlsa([sha256_match, sha512_other], [leaf.der], ["mx.good.test"]).authenticated


def test_tlsa_presentation_form_round_trips() -> None:
    data = hashlib.sha256(b"x").digest()
    rec = TlsaRecord.from_text("3 1 1 " + data.hex().upper()[:20] + " " + data.hex()[20:])
    assert rec == TlsaRecord(3, 1, 1, data)
    assert TlsaRecord.from_text(rec.to_text()) == rec
    with pytest.raises(ValueError):
        TlsaRecord.from_text("3 1 1 zz")


def test_empty_chain_and_garbage_certificate(ca: TestCA) -> None:
    rec = make_tlsa(ca.leaf("a.test").der)
    assert match_tlsa([rec], [], ["a.test"]).outcome is DaneOutcome.EMPTY_CHAIN
    with pytest.raises(CertificateParseError):
        match_tlsa([rec], [b"not a certificate"], ["a.test"])


@pytest.mark.parametrize(("pattern", "name", "ok"), [
    ("mx.good.test", "MX.good.test.", True),
    ("*.good.test", "mx.good.test", True),
    ("*.good.test", "good.test", False),
    ("*.good.test", "a.b.good.test", False),
    ("m*.good.test", "mx.good.test", False),
    ("*.test", "good.test", False),  # no wildcard directly under a top-level label
    ("*", "test", False),
])
def test_name_matching_wildcard_rules(pattern: str, name: str, ok: bool) -> None:
    """RFC 6125 section 6.4.3 as narrowed by RFC 7672 section 3.2.3 and RFC 8461 section 4.1."""
    assert name_matches(pattern, name) is ok
