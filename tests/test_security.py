"""Security: TLS + bearer token on the public APIs (gRPC and HTTP), mutual TLS between the router and the model services, and the
capability checks on shared-memory tensor handles.

A throwaway CA and certificates are made with the openssl CLI (the `cryptography` package is not a dependency).
One cluster runs with everything on; greedy output through it must equal target-only decoding, i.e. what the
plaintext cluster of test_e2e.py returns.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import torch

from minedraft.launcher import TLSFiles
from minedraft.rpc import server_credentials
from minedraft.runtime.transport import TensorExporter, TensorImporter, TransportError, leftover_segments
from minedraft.v1 import generate_pb2 as gpb, generate_pb2_grpc, model_service_pb2 as mpb, model_service_pb2_grpc
from services.router.api import BearerTokenAuth
from support import TARGET, chat, running_cluster, target_only

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

PROMPTS = ["Hello, how are you?", "What is the capital of France?"]
N = 20


# ---- a throwaway PKI ----------------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


def make_cert(d: Path, ca: tuple[Path, Path], name: str, usage: str) -> tuple[Path, Path]:
    """A leaf certificate for 127.0.0.1/localhost; usage is serverAuth or clientAuth."""
    ext = d / f"{name}.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-days", "2", "-out", f"{name}.pem", "-extfile", ext.name, cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "test-ca")
    rogue = make_ca(d, "rogue-ca")
    token = secrets.token_urlsafe(32)
    (d / "token").write_text(token + "\n")
    return dict(dir=d, ca=ca, router=make_cert(d, ca, "router", "serverAuth"),
                service=make_cert(d, ca, "service", "serverAuth"),
                router_client=make_cert(d, ca, "router-client", "clientAuth"),
                rogue_client=make_cert(d, rogue, "rogue-client", "clientAuth"), token=token,
                token_file=d / "token")


@pytest.fixture(scope="module")
def cluster(pki, tmp_path_factory):
    ca = str(pki["ca"][0])
    with running_cluster(tmp_path_factory.mktemp("logs-secure"), mode="psd",
                         public_tls=TLSFiles(ca, *map(str, pki["router"])),
                         internal_tls=TLSFiles(ca, *map(str, pki["service"]), *map(str, pki["router_client"])),
                         auth_token_file=str(pki["token_file"]), http_port=0,
                         router_args=["--max-batch-size", "4", "--num-speculative-tokens", "3", "--transport",
                                      "shm"]) as c:
        yield c


@pytest.fixture(scope="module")
def expected():
    """Target-only greedy decoding in this process: what the plaintext cluster returns (test_e2e.py)."""
    return target_only(PROMPTS, N, ignore_eos=True)


def bearer(token: str):
    return (("authorization", f"Bearer {token}"),)


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as exc:
        fn()
    return exc.value.code()


# ---- the public API -----------------------------------------------------------------------------------------------
def test_public_api_requires_the_token(cluster, pki):
    stub = generate_pb2_grpc.GenerationStub(cluster.channel())
    req = gpb.GenerateRequest(prompt=chat(PROMPTS[0]), max_new_tokens=4)
    wrong = [None, bearer("not-the-token"), bearer(pki["token"] + "x"), bearer(pki["token"][:-1]),
             (("authorization", f"Basic {pki['token']}"),), (("authorization", pki["token"]),),
             bearer(pki["token"]) + bearer("other")]  # two authorization headers: ambiguous, refused
    for md in wrong:
        assert code_of(lambda: stub.Generate(req, timeout=10, metadata=md)) == grpc.StatusCode.UNAUTHENTICATED, md
        assert code_of(lambda: list(stub.GenerateStream(req, timeout=10, metadata=md))) == \
            grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: stub.GetInfo(gpb.GetInfoRequest(), timeout=10, metadata=md)) == \
            grpc.StatusCode.UNAUTHENTICATED
    # garbage bytes without a token: refused for the token, never parsed
    raw = cluster.channel().unary_unary("/minedraft.v1.Generation/Generate")
    assert code_of(lambda: raw(b"\xff\xff\xff", timeout=10)) == grpc.StatusCode.UNAUTHENTICATED
    assert stub.GetInfo(gpb.GetInfoRequest(), timeout=10, metadata=bearer(pki["token"])).mode == "psd"
    # the scheme is case-insensitive (RFC 6750)
    assert stub.GetInfo(gpb.GetInfoRequest(), timeout=10,
                        metadata=(("authorization", f"bearer {pki['token']}"),)).mode == "psd"


def test_right_token_over_tls_gives_the_plaintext_output(cluster, pki, expected):
    stub = generate_pb2_grpc.GenerationStub(cluster.channel())
    for p, want in zip(PROMPTS, expected):
        req = gpb.GenerateRequest(prompt=chat(p), max_new_tokens=N, ignore_eos=True)
        r = stub.Generate(req, timeout=120, metadata=bearer(pki["token"]))
        assert list(r.token_ids) == want
        streamed = [t for m in stub.GenerateStream(req, timeout=120, metadata=bearer(pki["token"]))
                    for t in m.token_ids]
        assert streamed == want
        assert r.speculation.drafted_tokens > 0  # went through the drafter, over mTLS


def test_http_api_takes_the_same_tls_and_token(cluster, pki, expected):
    """HTTPS with the router's certificate; /v1/ needs the bearer token (401 otherwise, OpenAI's error shape);
    /health and /metrics stay open; the output equals the gRPC one."""
    assert cluster.http_url.startswith("https://")

    def curl(path: str, *args: str, url: str = cluster.http_url) -> tuple[str, str]:
        r = subprocess.run(["curl", "-sS", "--cacert", str(pki["ca"][0]), "-w", "\n%{http_code}", *args, url + path],
                           capture_output=True, text=True, timeout=120)
        body, _, code = r.stdout.rpartition("\n")
        return code, body

    body = json.dumps({"prompt": chat(PROMPTS[0]), "max_tokens": N, "temperature": 0, "ignore_eos": True,
                       "return_token_ids": True})
    for headers in ([], ["-H", "Authorization: Bearer not-the-token"], ["-H", f"Authorization: Basic {pki['token']}"]):
        code, answer = curl("/v1/completions", *headers, "-d", body)
        assert code == "401" and json.loads(answer)["error"]["code"] == "invalid_api_key", headers
    assert curl("/v1/models")[0] == "401"
    code, answer = curl("/v1/completions", "-H", f"Authorization: Bearer {pki['token']}", "-d", body)
    assert code == "200" and json.loads(answer)["choices"][0]["token_ids"] == expected[0]
    assert curl("/health")[0] == "200" and curl("/metrics")[0] == "200"
    plain = "http://" + cluster.http_url.removeprefix("https://")
    assert curl("/health", url=plain)[0] == "000"  # no plaintext answer from a TLS port


def test_sampled_requests_use_shm_handles_over_mtls(cluster, pki):
    from minedraft.v1 import common_pb2

    stub = generate_pb2_grpc.GenerationStub(cluster.channel())
    req = gpb.GenerateRequest(prompt=chat(PROMPTS[1]), max_new_tokens=12, ignore_eos=True,
                              sampling=common_pb2.SamplingOptions(temperature=0.8, seed=3))
    a = stub.Generate(req, timeout=120, metadata=bearer(pki["token"]))
    b = stub.Generate(req, timeout=120, metadata=bearer(pki["token"]))
    assert list(a.token_ids) == list(b.token_ids) and len(a.token_ids) == 12


def test_plaintext_is_refused_everywhere(cluster, pki):
    for role in ("router", "verifier", "drafter"):
        ch = grpc.insecure_channel(f"127.0.0.1:{cluster.port_of(role)}")
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        assert code_of(lambda: health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)) \
            == grpc.StatusCode.UNAVAILABLE, role
    plain = generate_pb2_grpc.GenerationStub(grpc.insecure_channel(cluster.address))
    assert code_of(lambda: plain.Generate(gpb.GenerateRequest(prompt="hi", max_new_tokens=2), timeout=5,
                                          metadata=bearer(pki["token"]))) == grpc.StatusCode.UNAVAILABLE


def test_model_services_require_a_client_certificate_from_our_ca(cluster, pki):
    ca = pki["ca"][0].read_bytes()
    variants = {
        "server TLS only, no client cert": grpc.ssl_channel_credentials(ca),
        "client cert from another CA": grpc.ssl_channel_credentials(ca, pki["rogue_client"][1].read_bytes(),
                                                                     pki["rogue_client"][0].read_bytes()),
    }
    for role in ("verifier", "drafter"):
        for what, creds in variants.items():
            ch = grpc.secure_channel(f"127.0.0.1:{cluster.port_of(role)}", creds)
            stub = (model_service_pb2_grpc.VerifierStub if role == "verifier" else model_service_pb2_grpc.DrafterStub)(ch)
            assert code_of(lambda: stub.GetModelInfo(mpb.ModelInfoRequest(), timeout=5)) == \
                grpc.StatusCode.UNAVAILABLE, f"{role}: {what}"
        info = model_service_pb2_grpc.VerifierStub(cluster.channel("verifier")).GetModelInfo(mpb.ModelInfoRequest(),
                                                                                             timeout=5)
        assert info.vocab_size > 0


def test_health_and_reflection_work_over_tls_without_token(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    wanted = {"router": "minedraft.v1.Generation", "verifier": "minedraft.v1.Verifier", "drafter": "minedraft.v1.Drafter"}
    for role, service in wanted.items():
        ch = cluster.channel(role)
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        assert service in set(ProtoReflectionDescriptorDatabase(ch).get_services())


def test_cli_generate_with_token_and_ca(cluster, pki, expected, capsys):
    from minedraft.cli import main

    args = ["generate", chat(PROMPTS[0]), "--raw", "--max-new-tokens", str(N), "--ignore-eos", "--address",
            cluster.address, "--ca", str(pki["ca"][0])]
    assert main(args) == 1  # no token
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(args + [f"--token={pki['token']}", "--no-stream"]) == 0
    out = capsys.readouterr().out
    from minedraft.runtime.checkpoint import load_tokenizer

    assert out.strip() == load_tokenizer(TARGET).decode(expected[0], skip_special_tokens=True).strip()


# ---- shared-memory capability handles -----------------------------------------------------------------------------
def test_importer_refuses_unintroduced_creator_and_wrong_token():
    exporter = TensorExporter(secrets.token_hex(6))
    importer = TensorImporter(torch.device("cpu"))
    t = torch.arange(12, dtype=torch.float32).view(3, 4)
    try:
        ref = exporter.export(t, "shm")
        with pytest.raises(TransportError, match="not introduced"):
            importer.open(ref)
        importer.trust(exporter.instance_id)
        forged = type(ref)()
        forged.CopyFrom(ref)
        forged.shm.token = bytes(b ^ 1 for b in ref.shm.token)
        with pytest.raises(TransportError, match="capability token"):
            importer.open(forged)
        other = type(ref)()
        other.CopyFrom(ref)
        other.shm.name = ref.shm.name.replace(exporter.instance_id, "0" * 12)  # someone else's segment name
        with pytest.raises(TransportError, match="was not made by"):
            importer.open(other)
        assert torch.equal(importer.open(ref), t)  # the genuine handle still works, once
        with pytest.raises(TransportError, match="does not exist"):
            importer.open(ref)
    finally:
        exporter.release_all()
    assert not leftover_segments(exporter.instance_id)


def test_verifier_answers_forged_handles_with_permission_denied(cluster):
    """A client that reaches the verifier (here: one holding a valid client certificate) hands it shm handles it did
    not get from the drafter: one from a creator the verifier was never introduced to, one naming the real drafter
    with a guessed token. Both steps fail with PERMISSION_DENIED, and the verifier keeps serving."""
    drafter_id = model_service_pb2_grpc.DrafterStub(cluster.channel("drafter")).GetModelInfo(
        mpb.ModelInfoRequest(), timeout=5).instance_id
    vocab = model_service_pb2_grpc.VerifierStub(cluster.channel("verifier")).GetModelInfo(
        mpb.ModelInfoRequest(), timeout=5).vocab_size
    probs = torch.full((1, vocab), 1.0 / vocab)
    stranger = TensorExporter(secrets.token_hex(6))
    impostor = TensorExporter(drafter_id)  # a segment named like the drafter's, with a token the drafter never gave
    impostor._counter = 10 ** 9  # names the drafter itself will not reach
    try:
        refs = {"unintroduced creator": stranger.export(probs, "shm"), "wrong token": impostor.export(probs, "shm")}
        refs["wrong token"].shm.token = secrets.token_bytes(16)
        stub = model_service_pb2_grpc.VerifierStub(cluster.channel("verifier"))
        for what, ref in refs.items():
            batch = mpb.VerifyBatch(draft_probs=ref)
            batch.seqs.add(seq_id=f"forged-{what}", start=0, tokens=[1, 2, 3], drafts=[4], probs_row=0,
                           sampling={"temperature": 1.0})
            replies = list(stub.Session(iter([mpb.VerifierRequest(step_id=1, verify=batch)]), timeout=30))
            assert len(replies) == 1 and replies[0].WhichOneof("kind") == "error", what
            assert replies[0].error.code == grpc.StatusCode.PERMISSION_DENIED.value[0], (what, replies[0].error)
        info = stub.GetModelInfo(mpb.ModelInfoRequest(), timeout=5)
        assert info.active_sequences == 0 and info.kv_blocks_in_use == 0
    finally:
        stranger.release_all()
        impostor.release_all()


# ---- units ----------------------------------------------------------------------------------------------------------
def test_bearer_token_comparison():
    auth = BearerTokenAuth("s3cret", ["minedraft.v1.Generation"])
    assert auth.allowed((("authorization", "Bearer s3cret"),))
    assert auth.allowed((("authorization", "BEARER s3cret"),))
    for md in [(), (("authorization", "Bearer s3cre"),), (("authorization", "Bearer s3cret "),),
               (("authorization", "s3cret"),), (("x-token", "Bearer s3cret"),),
               (("authorization", "Bearer s3cret"), ("authorization", "Bearer s3cret"))]:
        assert not auth.allowed(md), md
    with pytest.raises(ValueError):
        BearerTokenAuth("", ["x"])


def test_misconfigured_tls_is_refused(pki):
    cert, key = map(str, pki["service"])
    with pytest.raises(SystemExit, match="go together"):
        server_credentials(cert, "")
    with pytest.raises(SystemExit, match="needs --tls-cert"):
        server_credentials("", "", str(pki["ca"][0]))
    with pytest.raises(SystemExit, match="not a PEM"):
        server_credentials(str(pki["token_file"]), key)
    assert server_credentials(cert, key, str(pki["ca"][0])) is not None
