"""Clear exceptions for bad credentials, certificates and addresses; a resume
after a crash-safe gateway is killed and started again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import session_gateway as sg

from conftest import Gateway, NatsServer
from test_trading import next_of


async def test_an_unknown_api_key_is_refused_with_its_reason(gateway: Gateway) -> None:
    stranger = sg.Credentials.from_seed(999_999, bytes(32))
    with pytest.raises(sg.RefusedError) as refused:
        await sg.Client.connect(gateway.address, gateway.certificate, stranger)
    assert refused.value.reason is sg.Reason.UNKNOWN_API_KEY


async def test_a_wrong_key_or_venue_is_a_bad_signature_naming_both(gateway: Gateway) -> None:
    _account, real = gateway.credentials()[0]
    forged = sg.Credentials.from_seed(real.api_key_id, bytes(range(32)))
    with pytest.raises(sg.BadSignatureError) as refused:
        await sg.Client.connect(gateway.address, gateway.certificate, forged)
    assert refused.value.reason is sg.Reason.BAD_SIGNATURE
    assert (refused.value.api_key_id, refused.value.venue) == (real.api_key_id, sg.DEV_VENUE)
    with pytest.raises(sg.BadSignatureError) as wrong_venue:
        await sg.Client.connect(gateway.address, gateway.certificate, real, venue="PROD")
    assert wrong_venue.value.venue == "PROD" and "PROD" in str(wrong_venue.value)


async def test_a_certificate_the_gateway_does_not_hold_is_a_connection_error(
    gateway: Gateway, tmp_path: Path
) -> None:
    # Another development gateway's certificate: valid, but not this gateway's.
    other = Gateway(tmp_path, [])
    try:
        _account, credentials = gateway.credentials()[0]
        with pytest.raises(sg.GatewayConnectionError) as failed:
            await sg.Client.connect(gateway.address, other.certificate, credentials)
        assert "certificate" in str(failed.value).lower()
    finally:
        other.stop()


async def test_bad_inputs_are_config_errors(gateway: Gateway, tmp_path: Path) -> None:
    _account, credentials = gateway.credentials()[0]
    with pytest.raises(sg.ConfigError):
        await sg.Client.connect("no-port-here", gateway.certificate, credentials)
    with pytest.raises(sg.ConfigError):
        await sg.Client.connect(gateway.address, tmp_path / "missing.der", credentials)
    with pytest.raises(sg.ConfigError):
        sg.load_dev_keys(tmp_path / "missing.toml")
    with pytest.raises(ValueError):
        sg.Credentials.from_seed(1, b"short")
    with pytest.raises(ValueError):
        await sg.Client.connect(gateway.address, gateway.certificate, credentials, idle_timeout=-1)


async def test_no_gateway_at_the_address_is_a_connection_error(gateway: Gateway) -> None:
    _account, credentials = gateway.credentials()[0]
    gateway.stop()
    with pytest.raises(sg.GatewayConnectionError):
        await sg.Client.connect(gateway.address, gateway.certificate, credentials, idle_timeout=0.5)


async def test_a_session_resumes_after_a_crash_safe_gateway_is_killed_and_started_again(
    workdir: Path, nats: NatsServer
) -> None:
    gateway = Gateway(workdir, ['sequencer.mode="jetstream"', f'sequencer.nats_url="{nats.url}"'])
    try:
        maker = await gateway.connect(0, keep_alive=0.2)
        maker.new_order(1, 11, sg.Side.SELL, price=100, quantity=5)
        await next_of(maker, sg.Accepted)

        gateway.kill()
        gateway.start()

        # The book came back from the stream: a taker on the new process trades
        # against the order, and the maker, resumed without a new login, gets its fill.
        async with await gateway.connect(1) as taker:
            taker.new_order(1, 21, sg.Side.BUY, price=100, quantity=5)
            taker_fill = await next_of(taker, sg.Fill)
        resumed = await next_of(maker, sg.Resumed, timeout=30)
        assert resumed.lost is None or isinstance(resumed.lost, sg.Reason)
        maker_fill = await next_of(maker, sg.Fill, timeout=30)
        assert (maker_fill.trade_id, maker_fill.client_order_id) == (taker_fill.trade_id, 11)
        assert await maker.close() is sg.Reason.LOGGED_OUT
    finally:
        gateway.stop()


async def test_waiting_for_an_event_never_blocks_the_event_loop(gateway: Gateway) -> None:
    async with await gateway.connect(5) as client:
        await next_of(client, sg.Snapshot)
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.ensure_future(tick())
        # Nothing comes: the wait runs on the client's threads, the loop ticks on.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.next_event(), 0.3)
        ticker.cancel()
        assert ticks >= 10
