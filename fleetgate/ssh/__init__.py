"""The asyncio side of fleetgate: asyncssh server, client and relays.

Everything here runs on the asyncio loop that trio-asyncio hosts inside trio.run; code
outside this package is plain trio and is reached through trio_asyncio.trio_as_aio.
"""
