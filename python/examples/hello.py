"""Two demo accounts of a development gateway trade with each other; prints the fill.

Start a development gateway (`cargo run --release -p gateway`), then, from the same
directory: `python python/examples/hello.py [--gateway HOST:PORT]`.
"""

import argparse
import asyncio
import time

import session_gateway as sg


async def main(gateway: str) -> None:
    certificate = sg.load_certificate(".gateway-dev/cert.der")
    (seller_account, seller_key), (buyer_account, buyer_key), *_ = sg.load_dev_keys(
        ".gateway-dev/client-keys.toml"
    )
    async with await sg.Client.connect(gateway, certificate, seller_key) as seller, \
            await sg.Client.connect(gateway, certificate, buyer_key) as buyer:
        print(f"logged in: accounts {seller_account} and {buyer_account}")
        order_id = time.time_ns() // 1_000_000  # unique across runs against one gateway
        seller.new_order(1, order_id, sg.Side.SELL, price=100, quantity=10)
        buyer.new_order(1, order_id, sg.Side.BUY, price=100, quantity=10)
        async for event in buyer.events():
            print("buyer got", event)
            if isinstance(event, sg.Fill):
                print(f"filled: {event.quantity} at {event.price} (trade {event.trade_id})")
                break


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default=sg.DEFAULT_ADDRESS, help="HOST:PORT")
    asyncio.run(main(parser.parse_args().gateway))
