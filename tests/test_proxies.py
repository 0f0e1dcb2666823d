"""The client address behind proxies: X-Forwarded-For is believed only from TRUSTED_PROXIES."""

import pytest

from notifications.proxies import client_ip, scope_client_ip


@pytest.fixture
def trust(settings):
    def set_proxies(*proxies):
        settings.NOTIFICATIONS = {**settings.NOTIFICATIONS, "TRUSTED_PROXIES": list(proxies)}

    return set_proxies


def test_forged_header_from_an_untrusted_peer_is_ignored(trust):
    trust("10.0.0.1")
    assert client_ip("198.51.100.7", "203.0.113.9") == "198.51.100.7"


def test_header_from_a_trusted_proxy_gives_the_client(trust):
    trust("10.0.0.1")
    assert client_ip("10.0.0.1", "203.0.113.9") == "203.0.113.9"


def test_a_chain_is_read_from_the_right_skipping_trusted_hops(trust):
    trust("10.0.0.0/8")
    # The left-most value is whatever the client claimed; the first untrusted hop from the right is real.
    assert client_ip("10.0.0.1", "1.1.1.1, 203.0.113.9, 10.0.0.2") == "203.0.113.9"


def test_garbage_in_the_header_falls_back_to_the_peer(trust):
    trust("10.0.0.1")
    assert client_ip("10.0.0.1", "not-an-ip") == "10.0.0.1"


def test_x_real_ip_is_used_when_there_is_no_forwarded_for(trust):
    trust("10.0.0.1")
    assert client_ip("10.0.0.1", None, "203.0.113.5") == "203.0.113.5"


def test_ipv6_peers_and_networks(trust):
    trust("::1", "fd00::/8")
    assert client_ip("::1", "2001:db8::7") == "2001:db8::7"
    assert client_ip("2001:db8::1", "203.0.113.9") == "2001:db8::1"


def test_no_trusted_proxies_means_the_peer(trust):
    trust()
    scope = {"client": ["127.0.0.1", 5000], "headers": [(b"x-forwarded-for", b"203.0.113.9")]}
    assert scope_client_ip(scope) == "127.0.0.1"


def test_repeated_forwarded_for_headers_are_joined(trust):
    trust("127.0.0.1")
    scope = {"client": ["127.0.0.1", 5000],
             "headers": [(b"x-forwarded-for", b"198.51.100.1"), (b"x-forwarded-for", b"203.0.113.9")]}
    assert scope_client_ip(scope) == "203.0.113.9"
