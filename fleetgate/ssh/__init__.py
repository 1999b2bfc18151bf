"""The SSH session core: the asyncio side of fleetgate (asyncssh), kept small and in one place.

- server.py   listeners (asyncssh acceptors) and the reload of their options;
- context.py  what every connection shares (config, keys, limits, fleet, metrics);
- front.py    one user's connection: authentication, then channels;
- relay.py    a session channel relayed to the machine, messages in the machine's order;
- pipe.py     byte-stream splices for jump, -L and -R channels; forwards.py opens them;
- upstream.py the gateway's own SSH login to a machine (host key verified);
- algorithms.py which algorithms the front offers; limits.py, grace.py pre-auth bounds;
- bridge.py   the only module that knows trio-asyncio (every trio↔asyncio crossing);
- internals.py the only module that touches asyncssh's private names.

The login policy itself (route → wake → upstream → retry) is plain trio in
fleetgate/login.py; this package calls it once per login through the bridge.
"""
