"""The front's algorithm policy, from plain KEXINIT name-lists: no sockets."""

from __future__ import annotations

import struct
from pathlib import Path

import asyncssh
import pytest

from fleetgate import config as C
from fleetgate.ssh import algorithms as A
from fleetgate.ssh import internals
from fleetgate.ssh.limits import LimitsConfig, PreauthLimiter

GCM = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
# What OpenSSH 9.2's ssh sends (ssh -vv "local client KEXINIT proposal"), shortened.
OPENSSH_CLIENT = dict(
    kex=("sntrup761x25519-sha512@openssh.com", "curve25519-sha256", "curve25519-sha256@libssh.org",
         "ecdh-sha2-nistp256", "diffie-hellman-group-exchange-sha256", "diffie-hellman-group14-sha256",
         "ext-info-c", "kex-strict-c-v00@openssh.com"),
    host_key=("ssh-ed25519-cert-v01@openssh.com", "ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-512"),
    enc=("chacha20-poly1305@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr") + GCM,
    mac=("umac-64-etm@openssh.com", "hmac-sha2-256-etm@openssh.com", "hmac-sha2-256"),
)
# Dropbear 2022.83's dbclient: no AES-GCM, a guessed first kex packet.
DROPBEAR_CLIENT = dict(
    kex=("curve25519-sha256", "curve25519-sha256@libssh.org", "ecdh-sha2-nistp521", "ecdh-sha2-nistp384",
         "ecdh-sha2-nistp256", "diffie-hellman-group14-sha256", "diffie-hellman-group14-sha1",
         "kexguess2@matt.ucc.asn.au"),
    host_key=("ssh-ed25519", "ecdsa-sha2-nistp256", "rsa-sha2-256", "ssh-rsa"),
    enc=("aes128-ctr", "aes256-ctr", "chacha20-poly1305@openssh.com"),
    mac=("hmac-sha1", "hmac-sha2-256"),
)


def namelist(names) -> bytes:
    data = ",".join(names).encode()
    return struct.pack(">I", len(data)) + data


def kexinit_payload(kex, host_key, enc, mac, follows=False, enc_sc=None) -> bytes:
    """A KEXINIT payload after its message number, as a client sends it."""
    return (b"\x11" * 16 + namelist(kex) + namelist(host_key) + namelist(enc) + namelist(enc_sc or enc)
            + namelist(mac) + namelist(mac) + namelist(["none"]) * 2 + namelist([]) * 2
            + bytes([follows]) + b"\0\0\0\0")


def client(spec, follows=False, **over) -> A.Kexinit:
    s = {**spec, **over}
    return A.parse_kexinit(kexinit_payload(s["kex"], s["host_key"], s["enc"], s["mac"], follows))


def gateway_config(**gateway) -> C.GatewayConfig:
    return C.GatewayConfig(listen=(), host_keys=(), upstream_key=None, state_dir=Path("."), **gateway)


def default_policy(**gateway) -> A.FrontPolicy:
    return A.policy(gateway_config(**gateway))


def never(_name: str) -> bool:
    return False


def always(_name: str) -> bool:
    return True


def test_parse_kexinit_reads_every_list_and_the_guess_flag():
    k = client(OPENSSH_CLIENT, follows=True)
    assert k.kex == OPENSSH_CLIENT["kex"]
    assert k.host_key == OPENSSH_CLIENT["host_key"]
    assert k.enc_cs == k.enc_sc == OPENSSH_CLIENT["enc"]
    assert k.mac_cs == OPENSSH_CLIENT["mac"]
    assert k.first_kex_follows is True
    with pytest.raises(A.KexinitError):
        A.parse_kexinit(kexinit_payload(("a",), ("b",), ("c",), ("d",))[:-7])
    with pytest.raises(A.KexinitError):
        A.parse_kexinit(b"\0" * 16 + struct.pack(">I", 1 << 30))


def test_openssh_client_is_offered_only_aes_gcm_and_negotiates_its_first_gcm():
    p = default_policy()
    assert p.steer and p.wait > 0
    offer = p.answer(client(OPENSSH_CLIENT), ["ssh-ed25519"], always)
    assert offer.ciphers == GCM
    assert A.first_common(OPENSSH_CLIENT["enc"], offer.ciphers) == "aes128-gcm@openssh.com"
    # Everything else stays as OpenSSH's sshd offers it.
    assert set(offer.kex) == set(A.OPENSSH_KEX_AVAILABLE)
    assert offer.macs == A.OPENSSH_MACS


def test_clients_without_gcm_get_the_full_list_and_keep_their_own_choice():
    p = default_policy()
    offer = p.answer(client(DROPBEAR_CLIENT), ["ssh-ed25519"], always)
    assert offer.ciphers == A.OPENSSH_CIPHERS
    assert A.first_common(DROPBEAR_CLIENT["enc"], offer.ciphers) == "aes128-ctr"
    chacha_only = client(OPENSSH_CLIENT, enc=("chacha20-poly1305@openssh.com",))
    assert "chacha20-poly1305@openssh.com" in p.answer(chacha_only, ["ssh-ed25519"], always).ciphers
    # GCM one way only is not enough to steer (the other direction would fail).
    k = A.parse_kexinit(kexinit_payload(OPENSSH_CLIENT["kex"], OPENSSH_CLIENT["host_key"], ("aes128-ctr",),
                                        OPENSSH_CLIENT["mac"], enc_sc=GCM))
    assert A.steer_ciphers(k, A.OPENSSH_CIPHERS) == list(A.OPENSSH_CIPHERS)


def test_pinned_ciphers_are_offered_as_configured_and_not_waited_for():
    p = default_policy(ciphers=("chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com"))
    assert not p.steer and p.wait == 0
    offer = p.answer(client(OPENSSH_CLIENT), ["ssh-ed25519"], always)
    assert offer.ciphers == ("chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com")


def test_answer_puts_the_clients_choices_first_so_a_guess_is_judged_as_rfc_4253_says():
    p = default_policy()
    db = client(DROPBEAR_CLIENT, follows=True)
    offer = p.answer(db, ["ecdsa-sha2-nistp256", "ssh-ed25519"], always)
    assert offer.kex[0] == "curve25519-sha256" and offer.host_key[0] == "ssh-ed25519"
    ours = A.Kexinit(kex=offer.kex, host_key=offer.host_key, enc_cs=(), enc_sc=(), mac_cs=(), mac_sc=())
    assert A.guessed_right(db, ours)
    # Sent first with our own order (mlkem768x25519 first): Dropbear's guess is wrong and
    # its guessed packet must be skipped; asyncssh alone would have used it.
    sent = A.Kexinit(kex=A.OPENSSH_KEX_AVAILABLE, host_key=("ssh-ed25519",), enc_cs=(), enc_sc=(), mac_cs=(),
                     mac_sc=())
    assert A.OPENSSH_KEX_AVAILABLE[0] != "curve25519-sha256"
    assert not A.guessed_right(db, sent)
    # Same kex, different first host key: also wrong.
    other_hk = client(DROPBEAR_CLIENT, host_key=("ecdsa-sha2-nistp256", "ssh-ed25519"))
    assert not A.guessed_right(other_hk, ours)


def test_expensive_kex_is_taken_off_the_offer_when_over_budget():
    p = default_policy()
    dh_first = client(OPENSSH_CLIENT, kex=("diffie-hellman-group18-sha512", "curve25519-sha256"))
    asked = []
    offer = p.answer(dh_first, ["ssh-ed25519"], lambda name: asked.append(name) or False)
    assert asked == ["diffie-hellman-group18-sha512"]
    assert not any(A.is_expensive_kex(k) for k in offer.kex)
    assert offer.kex[0] == "curve25519-sha256"
    assert p.answer(dh_first, ["ssh-ed25519"], always).kex[0] == "diffie-hellman-group18-sha512"
    # A cheap choice never draws on the budget.
    p.answer(client(OPENSSH_CLIENT), ["ssh-ed25519"], lambda name: pytest.fail(name))
    # Our list already went out: a DH-only client over budget is refused.
    sent = A.Kexinit(kex=A.OPENSSH_KEX_AVAILABLE, host_key=("ssh-ed25519",), enc_cs=(), enc_sc=(), mac_cs=(),
                     mac_sc=())
    dh_only = client(OPENSSH_CLIENT, kex=("diffie-hellman-group18-sha512",))
    with pytest.raises(A.KexRefused):
        p.check_sent(dh_only, sent, never)
    p.check_sent(dh_only, sent, always)
    p.check_sent(client(OPENSSH_CLIENT), sent, never)


def test_host_keys_without_sha1_rsa_unless_that_is_all():
    p = default_policy()
    assert p.host_keys(["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]) == ["rsa-sha2-512", "rsa-sha2-256"]
    assert p.host_keys(["ssh-rsa"]) == ["ssh-rsa"]


def test_front_options_follow_openssh_and_asyncssh_accepts_them():
    opts = A.front_options(gateway_config())
    assert "ssh-rsa" not in opts["signature_algs"] and "rsa-sha2-512" in opts["signature_algs"]
    assert opts["encryption_algs"] == list(A.OPENSSH_CIPHERS)
    for k in ("diffie-hellman-group14-sha256", "diffie-hellman-group16-sha512", "diffie-hellman-group18-sha512",
              "diffie-hellman-group-exchange-sha256", "curve25519-sha256"):
        assert k in opts["kex_algs"]
    assert not any(k.endswith("sha1") or k.startswith("gss-") for k in opts["kex_algs"])
    # asyncssh knows every name (a typo would surface as a failed handshake).
    asyncssh.SSHServerConnectionOptions(**{k: v for k, v in opts.items()})
    assert set(A.OPENSSH_MACS) <= set(C.KNOWN_MACS)
    assert set(A.OPENSSH_KEX_AVAILABLE) <= set(C.KNOWN_KEX_ALGORITHMS)
    assert set(A.OPENSSH_CIPHERS) == set(C.KNOWN_CIPHERS)


def test_kexinit_handling_installs_on_the_pinned_asyncssh():
    # If a dependency bump makes this fail, re-check the KEXINIT hooks against asyncssh.
    assert internals.install_kexinit_policy(default_policy()), asyncssh.__version__


def test_expensive_kex_budget_global_and_per_source():
    now = [0.0]
    refused = []
    lim = PreauthLimiter(LimitsConfig(expensive_kex_per_second=2, expensive_kex_per_source_per_minute=3,
                                      exempt=("10.0.0.0/8",)),
                         count=refused.append, clock=lambda: now[0])
    assert lim.expensive_kex("1.1.1.1") and lim.expensive_kex("1.1.1.1")
    assert not lim.expensive_kex("2.2.2.2")          # global: 2 a second
    assert refused == ["kex_budget"]
    now[0] += 0.5
    assert lim.expensive_kex("1.1.1.1")              # one global token back; 3rd of the source's
    now[0] += 1.0
    assert not lim.expensive_kex("1.1.1.1")          # the source's 3 a minute are spent
    assert lim.expensive_kex("2.2.2.2")              # another source is not
    now[0] += 20.0
    assert lim.expensive_kex("1.1.1.1")              # a minute's share refilled
    for _ in range(5):                               # exempt networks: only the global bucket
        now[0] += 0.5
        assert lim.expensive_kex("10.1.2.3")


def test_only_the_big_groups_count_as_expensive():
    # bench/preauth_cpu.py: group14 costs what curve25519 costs; group16 1.3-1.8x, group18 and
    # an 8192-bit group exchange 3.2-4x.
    assert not A.is_expensive_kex("diffie-hellman-group14-sha256")
    assert not A.is_expensive_kex("curve25519-sha256") and not A.is_expensive_kex("mlkem768x25519-sha256")
    for k in ("diffie-hellman-group16-sha512", "diffie-hellman-group18-sha512", "diffie-hellman-group-exchange-sha256"):
        assert A.is_expensive_kex(k)


def test_rekey_budget_per_connection_per_source_and_global():
    """Issue 25 item 3: every key re-exchange a client starts is counted, and a connection,
    a source or the gateway over its budget is refused (counted as rekey_rate)."""
    now = [0.0]
    refused = []
    lim = PreauthLimiter(LimitsConfig(rekey_per_connection_per_minute=3, rekey_per_source_per_minute=5,
                                      rekey_per_second=4, exempt=("10.0.0.0/8",)),
                         count=refused.append, clock=lambda: now[0])
    from fleetgate.ssh.limits import _Rekeys
    a, b, c = _Rekeys(lim, "1.1.1.1"), _Rekeys(lim, "1.1.1.1"), _Rekeys(lim, "2.2.2.2")
    assert [a.allow() for _ in range(4)] == [True, True, True, False]  # the connection's 3 a minute
    assert refused == ["rekey_rate"]
    now[0] += 1.0
    assert b.allow() and b.allow()                    # the source's 5th
    now[0] += 1.0
    assert not b.allow()                              # the source's 5 a minute are spent
    assert c.allow()                                  # another source is not
    now[0] += 60.0
    assert a.allow()                                  # a minute later, refilled
    g = [_Rekeys(lim, f"10.0.0.{i}") for i in range(8)]  # exempt: no per-source bucket, the global one
    assert [x.allow() for x in g] == [True] * 3 + [False] * 5  # 4 a second, one taken by `a` above
    assert refused.count("rekey_rate") == 7


def test_a_rekey_answer_takes_expensive_kex_off_over_budget():
    p = default_policy()
    k = client(OPENSSH_CLIENT, kex=("diffie-hellman-group16-sha512", "curve25519-sha256"))
    assert "diffie-hellman-group16-sha512" in p.rekey_kex(k, always)
    offered = p.rekey_kex(k, never)
    assert not any(A.is_expensive_kex(x) for x in offered) and "curve25519-sha256" in offered


def test_connections_cut_for_rekeying_count_towards_the_source_penalty():
    """A flood that reconnects after each cut trades re-exchanges for whole handshakes: each cut
    is a strike, as a failed login is, and penalty_after of them block the source."""
    from fleetgate.ssh.limits import _Rekeys

    class Conn:
        def abort(self) -> None:
            pass
    now = [0.0]
    refused = []
    lim = PreauthLimiter(LimitsConfig(rekey_per_connection_per_minute=1, penalty_after=3, exempt=("10.0.0.0/8",)),
                         count=refused.append, clock=lambda: now[0])
    for _ in range(3):
        conn = Conn()
        assert lim.admit("1.1.1.1", conn)
        r = _Rekeys(lim, "1.1.1.1")
        assert r.allow() and not r.allow()
        lim.closed("1.1.1.1", conn, failed_auth=False)
    assert not lim.admit("1.1.1.1", Conn()) and refused[-1] == "penalty"
    for _ in range(5):  # exempt networks are never blocked
        conn = Conn()
        assert lim.admit("10.1.1.1", conn)
        r = _Rekeys(lim, "10.1.1.1")
        assert r.allow() and not r.allow()
        lim.closed("10.1.1.1", conn, failed_auth=False)


def test_connections_refused_an_expensive_kex_and_gone_unauthenticated_are_strikes(monkeypatch):
    from fleetgate.ssh import limits as L

    def set_kex_budget(conn, allow, allow_rekey=None):
        conn._fg_kex_budget = allow
    monkeypatch.setattr(L.internals, "set_kex_budget", set_kex_budget)

    class Conn:
        def abort(self) -> None:
            pass
    now = [0.0]
    lim = PreauthLimiter(LimitsConfig(expensive_kex_per_source_per_minute=1, penalty_after=3),
                         count=lambda reason: None, clock=lambda: now[0])
    first = Conn()
    assert lim.admit("1.1.1.1", first) and first._fg_kex_budget("diffie-hellman-group16-sha512")
    lim.authenticated("1.1.1.1", first)  # a user who got their DH exchange and logged in: no strike
    for _ in range(3):
        conn = Conn()
        assert lim.admit("1.1.1.1", conn)
        assert not conn._fg_kex_budget("diffie-hellman-group16-sha512")
        lim.closed("1.1.1.1", conn, failed_auth=False)
    assert not lim.admit("1.1.1.1", Conn())  # blocked
