"""The auth service: signing keys, access tokens and (later) users, API keys and revocation."""
