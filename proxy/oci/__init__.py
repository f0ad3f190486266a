"""The pure core: references, digests, media types, manifests and the error tree.

Nothing here imports aiohttp, grpc, or touches the disk.
"""
