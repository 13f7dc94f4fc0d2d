"""Property tests (hypothesis) of the SSRF boundary: external runner URLs and model references.

The operator POSTs to the ``runners.url`` users write, so ``reconcile.runners.external_url_problem``
must refuse metadata and link-local hosts in every spelling, even when an administrator put that
very host on ``--allowed-runner-hosts``; and the refusal must reach ``target_from_object`` so no
worker is ever started for it. Model references are never turned into hosts to call (they are
sent as JSON values to the runner), which the last property checks. Neighbours:
test_runner_views.py (examples), test_fuzz_dmrmodel.py.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dmr_operator.reconcile import dmrmodel, runners

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

link_local_v4 = st.ip_addresses(v=4, network="169.254.0.0/16").map(str)
link_local_v6 = st.ip_addresses(v=6, network="fe80::/10").map(lambda a: f"[{a}]")
metadata_names = st.sampled_from(
    [
        "metadata.google.internal",
        "metadata",
        "169.254.169.254",
        "[fd00:ec2::254]",
        "100.100.100.200",
    ]
)


@st.composite
def spellings(draw: st.DrawFn, hosts: st.SearchStrategy[str]) -> str:
    """A host spelled the ways URLs allow: case, a trailing dot, a port."""
    host = draw(hosts)
    if not host.startswith("[") and draw(st.booleans()):
        host = "".join(c.upper() if draw(st.booleans()) else c for c in host)
    if not host.startswith("[") and draw(st.booleans()):
        host += "."
    if draw(st.booleans()):
        host += f":{draw(st.integers(min_value=1, max_value=65535))}"
    return host


forbidden_urls = st.builds(
    lambda scheme, host, path: f"{scheme}://{host}{path}",
    st.sampled_from(["http", "https", "HTTP"]),
    spellings(link_local_v4 | link_local_v6 | metadata_names),
    st.sampled_from(["", "/", "/latest/meta-data", "/engines/_configure", "?x=1", "#f"]),
)


def _as_allowed(url: str) -> list[str]:
    """The worst case: the administrator allow-listed exactly the host (and host:port) written."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return [host, host.rstrip("."), f"{host}:{parts.port}", parts.netloc]


@FUZZ
@given(url=forbidden_urls)
@example(url="http://169.254.169.254./latest")
@example(url="http://[fe80::1%25eth0]:12434/")
def test_metadata_and_link_local_hosts_are_refused_even_when_allow_listed(url: str) -> None:
    assert runners.external_url_problem(url, _as_allowed(url)) is not None
    spec = {"model": "ai/smollm2", "runners": {"url": url}}
    target = dmrmodel.target_from_object(
        {"metadata": {"namespace": "ns", "name": "m"}, "spec": spec},
        allowed_runner_hosts=_as_allowed(url),
    )
    assert not target.valid and any("runners" in p for p in target.problems)


@FUZZ
@given(
    url=st.builds(
        lambda host, port: f"http://{host}:{port}/",
        st.sampled_from(["runner.example", "10.0.0.7", "dmr.internal.corp"]),
        st.integers(min_value=1, max_value=65535),
    ),
    others=st.lists(st.sampled_from(["a.example", "b.example", "10.0.0.8"]), max_size=3),
)
def test_only_allow_listed_hosts_pass(url: str, others: list[str]) -> None:
    assert runners.external_url_problem(url, others) is not None
    assert runners.external_url_problem(url, [*others, urlsplit(url).hostname or ""]) is None


@FUZZ
@given(
    url=st.text(max_size=60) | st.builds(lambda s: f"http://{s}", st.text(max_size=30)),
    allowed=st.lists(st.text(max_size=20), max_size=3),
)
def test_arbitrary_urls_never_raise(url: str, allowed: list[str]) -> None:
    problem = runners.external_url_problem(url, allowed)
    if problem is None:
        host = (urlsplit(url).hostname or "").rstrip(".")
        assert host and host.lower() in {a.strip().lower().rstrip(".") for a in allowed} | {
            a.split(":")[0].strip().lower() for a in allowed
        }
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return
        assert not address.is_link_local


@pytest.mark.parametrize(
    "url",
    [
        "http://[::ffff:169.254.169.254]/",
        "http://0xa9fea9fe/",
        "http://2852039166/",
        "http://0251.0376.0251.0376/",
    ],
)
def test_other_spellings_of_the_metadata_address_are_refused(url: str) -> None:
    assert runners.external_url_problem(url, _as_allowed(url)) is not None


@pytest.mark.parametrize("url", ["http://[", "http://a:b", "http://0::", "http://[::1"])
def test_unparseable_urls_are_problems_not_crashes(url: str) -> None:
    target = dmrmodel.target_from_object(
        {
            "metadata": {"namespace": "ns", "name": "m"},
            "spec": {"model": "x", "runners": {"url": url}},
        }
    )
    assert not target.valid


@FUZZ
@given(model=st.text(max_size=40))
def test_model_references_never_become_runner_hosts(model: str) -> None:
    """A model reference naming a host (hf.co/..., 169.254.169.254/x) selects the pool's pods,
    never a URL the operator calls: targets without runners.url have no url at all."""
    target = dmrmodel.target_from_object(
        {"metadata": {"namespace": "ns", "name": "m"}, "spec": {"model": model}}
    )
    assert target.url is None
