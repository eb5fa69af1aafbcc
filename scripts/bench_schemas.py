"""The JSON schema benchmark 5 (scripts/bench_constrained.py) constrains answers to, an inventory, and the tool that
takes one; tests that replay the benchmark's workload import them from here (this module imports nothing)."""

ITEM = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "count": {"type": "integer", "minimum": 0, "maximum": 1000},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "count", "tags"],
}
INVENTORY = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 40}, "items": {"type": "array", "items": ITEM}},
    "required": ["title", "items"],
}
TOOL = {"type": "function", "function": {"name": "save_inventory", "description": "Save an inventory.",
                                         "parameters": INVENTORY}}  # fmt: skip
