"""A TLS-terminating TCP relay for tests: HTTPS in front of the plain-HTTP mock upstream.

Usage: tls_proxy.py CERT KEY UPSTREAM_HOST:PORT
Prints `LISTENING <port>` once bound (on 127.0.0.1 and, where available, ::1), then one `SNI <name>` line for each
TLS handshake, so a test can check the server name the gateway sent.
"""

import asyncio
import ssl
import sys


async def relay(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def main():
    cert, key, upstream = sys.argv[1], sys.argv[2], sys.argv[3]
    up_host, up_port = upstream.rsplit(":", 1)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def on_sni(_sslobj, server_name, _ctx):
        print(f"SNI {server_name}", flush=True)

    context.sni_callback = on_sni

    async def handle(client_reader, client_writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(up_host, int(up_port))
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(relay(client_reader, up_writer), relay(up_reader, client_writer))

    # "localhost" may resolve to either loopback address: serve both on one port.
    servers = [await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)]
    port = servers[0].sockets[0].getsockname()[1]
    try:
        servers.append(await asyncio.start_server(handle, "::1", port, ssl=context))
    except OSError:
        pass
    print(f"LISTENING {port}", flush=True)
    await asyncio.gather(*(server.serve_forever() for server in servers))


if __name__ == "__main__":
    asyncio.run(main())
