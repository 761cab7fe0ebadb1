"""The device-agent daemon: discovery, control plane, data plane, shard execution.

Built by a later issue; the folder exists so the layout and the import name are fixed.
"""
