"""Workflows in the front end's UI format, turned into API-format prompts and checked against the
node definitions a real server reports at ``/object_info``.

A UI workflow stores each node's widget values as a list (``widgets_values``) in the order the
front end creates the widgets: the node's inputs in ``input_order`` (required, then optional),
widgets only, with two extra values the server never sees: ``control_after_generate`` after an
INT input that has the flag (or, when the flag is absent, is named ``seed`` or ``noise_seed``),
and the upload button after an ``image_upload``-style input. ``to_prompt`` maps those values to
input names the way the front end's own "queue prompt" does, follows links through Reroute,
PrimitiveNode and bypassed nodes, and drops nodes that never execute. ``prompt_problems`` then
checks the prompt as the server would, except that model-file lists are only required to hold
strings (the test machines have no model files).

For graphs without subgraphs this reproduces the front end's own conversion (``graphToPrompt``,
front end 1.27). Not modelled: subgraphs, and widgets that front-end extensions add on their own
(3D previews, refresh buttons); a node with those fails the widget count check.
"""
from __future__ import annotations

import re

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# ComfyUI v0.19's dynamic combo: a combo whose chosen option brings its own inputs, named
# "<combo>.<input>" in the API prompt and following the combo's value in ``widgets_values``.
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
SEED_NAMES = {"seed", "noise_seed"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
# Front-end-only nodes: documentation and wiring helpers; the server never sees them.
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
# Combo inputs whose options are the files present on the server.
FILE_LIST_INPUT = re.compile(r"^(ckpt_name|unet_name|clip_name\d*|vae_name|lora_name|image)$")


class WorkflowError(ValueError):
    """The workflow does not fit the node definitions it was converted against."""


def input_spec_options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def input_kind(spec) -> str:
    """INT, FLOAT, STRING, BOOLEAN, COMBO or a socket type such as MODEL."""
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def combo_options(spec) -> list:
    return spec[0] if isinstance(spec[0], list) else input_spec_options(spec).get("options", [])


def is_widget(spec) -> bool:
    kind = input_kind(spec)
    return (kind in WIDGET_TYPES or kind == DYNAMIC_COMBO) and not input_spec_options(spec).get("forceInput")


def dynamic_option_inputs(spec, value) -> list[tuple[str, list, bool]]:
    """(name, spec, required) of the inputs the dynamic combo's option ``value`` brings."""
    for option in input_spec_options(spec).get("options", []):
        if option["key"] == value:
            inputs = option.get("inputs", {})
            return [(name, sub, section == "required") for section in ("required", "optional")
                    for name, sub in (inputs.get(section) or {}).items()]
    return []


def expanded_inputs(node_info: dict, values: dict) -> list[tuple[str, list, bool]]:
    """``declared_inputs`` with each dynamic combo's chosen option's inputs after it, named
    "<combo>.<input>" (``values``: the node's inputs by name, which choose the options)."""
    out = []

    def add(inputs, prefix):
        for name, spec, required in inputs:
            out.append((prefix + name, spec, required))
            if input_kind(spec) == DYNAMIC_COMBO:
                add(dynamic_option_inputs(spec, values.get(prefix + name)), prefix + name + ".")

    add(declared_inputs(node_info), "")
    return out


def declared_inputs(node_info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, required) of each input in the order the front end creates them."""
    inputs = node_info.get("input", {})
    order = node_info.get("input_order") or {s: list(inputs.get(s) or {}) for s in ("required", "optional")}
    return [(name, inputs[section][name], section == "required")
            for section in ("required", "optional") for name in order.get(section, [])]


def widget_values(node: dict, node_info: dict) -> dict:
    """Input name -> value from the node's ``widgets_values``; the count must match exactly.

    Front-end-only values (control_after_generate, upload buttons) are dropped; a dynamic
    combo's value is followed by the values of its chosen option's widgets.
    """
    values = node.get("widgets_values", [])
    if isinstance(values, dict):  # some custom front ends save widgets by name
        return dict(values)
    remaining = list(values)
    out, expected = {}, []

    def take(inputs, prefix):
        for name, spec, _ in inputs:
            if not is_widget(spec):
                continue
            expected.append(prefix + name)
            if not remaining:
                return
            value = out[prefix + name] = remaining.pop(0)
            options = input_spec_options(spec)
            control = options.get("control_after_generate")
            if control is None:
                control = input_kind(spec) == "INT" and name in SEED_NAMES
            extra = int(bool(control)) + int(any(options.get(flag) for flag in UPLOAD_FLAGS))
            for _ in range(extra):
                expected.append("(front-end value)")
                if remaining:
                    remaining.pop(0)
            if input_kind(spec) == DYNAMIC_COMBO:
                take(dynamic_option_inputs(spec, value), prefix + name + ".")

    take(declared_inputs(node_info), "")
    if remaining or len(expected) != len(values):
        raise WorkflowError(f"node {node['id']} ({node['type']}): {len(values)} widget values "
                            f"{values!r}, but its definition makes {len(expected)} widgets {expected}")
    return out


class Graph:
    """Lookup tables over one UI workflow."""

    def __init__(self, workflow: dict):
        self.workflow = workflow
        self.nodes = {node["id"]: node for node in workflow["nodes"]}
        # link id -> (origin node, origin slot, target node, target slot, type)
        self.links = {link[0]: tuple(link[1:6]) for link in workflow.get("links", [])}

    def input_link(self, node: dict, name: str):
        for slot in node.get("inputs", []):
            if slot["name"] == name and slot.get("link") is not None:
                return slot["link"]
        return None

    def resolve(self, link_id):
        """What a link delivers: ("link", node id, slot), ("value", v), or None (muted/dangling)."""
        origin_id, origin_slot, _, _, link_type = self.links[link_id]
        origin = self.nodes.get(origin_id)
        if origin is None:
            raise WorkflowError(f"link {link_id} starts at missing node {origin_id}")
        if origin["type"] == "Reroute":
            upstream = origin.get("inputs", [{}])[0].get("link")
            return self.resolve(upstream) if upstream is not None else None
        if origin["type"] == "PrimitiveNode":
            return ("value", origin["widgets_values"][0])
        mode = origin.get("mode", MODE_ALWAYS)
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:
            return self._through_bypassed(origin, origin_slot, link_type)
        return ("link", origin_id, origin_slot)

    def _through_bypassed(self, node: dict, slot: int, link_type: str):
        """A bypassed node passes on the input of the output's type (same slot first)."""
        inputs = node.get("inputs", [])
        candidates = ([inputs[slot]] if slot < len(inputs) else []) + inputs
        for candidate in candidates:
            if candidate.get("type") == link_type and candidate.get("link") is not None:
                return self.resolve(candidate["link"])
        return None


def to_prompt(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt ``{node id: {"class_type", "inputs"}}`` the front end would queue."""
    graph = Graph(workflow)
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise WorkflowError(f"node {node['id']}: type {node['type']!r} is not in /object_info")
        widgets = widget_values(node, info)
        inputs = {}
        for name, spec, _ in expanded_inputs(info, widgets):
            link_id = graph.input_link(node, name)
            if link_id is not None:
                source = graph.resolve(link_id)
                if source is None:
                    continue
                inputs[name] = source[1] if source[0] == "value" else [str(source[1]), source[2]]
            elif name in widgets:
                inputs[name] = widgets[name]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def types_compatible(output_type: str, input_type: str) -> bool:
    """The front end's rule: equal, a wildcard, or one of a comma-separated list."""
    if "*" in (output_type, input_type) or output_type == input_type:
        return True
    return bool(set(output_type.split(",")) & set(input_type.split(",")))


def value_problem(name: str, spec, value) -> str | None:
    kind = input_kind(spec)
    options = input_spec_options(spec)
    if kind == DYNAMIC_COMBO:
        keys = [o["key"] for o in options.get("options", [])]
        return None if value in keys else f"{name}: {value!r} is not one of {keys}"
    if kind == "COMBO":
        if FILE_LIST_INPUT.match(name):
            return None if isinstance(value, str) and value else f"{name}: file name {value!r} is not a name"
        allowed = combo_options(spec)
        return None if value in allowed else f"{name}: {value!r} is not one of {allowed}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}: {value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{name}: {value!r} is not a string"
    if kind == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{name}: {value!r} is not an integer"
    if kind == "FLOAT" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"{name}: {value!r} is not a number"
    if "min" in options and value < options["min"]:
        return f"{name}: {value} is below the minimum {options['min']}"
    if "max" in options and value > options["max"]:
        return f"{name}: {value} is above the maximum {options['max']}"
    return None


def prompt_problems(prompt: dict, object_info: dict) -> list[str]:
    """Everything the server's validation would reject, model files aside; [] when valid."""
    problems = []
    for node_id, node in prompt.items():
        where = f"node {node_id} ({node['class_type']})"
        info = object_info.get(node["class_type"])
        if info is None:
            problems.append(f"{where}: unknown node type")
            continue
        declared = {name: (spec, required) for name, spec, required in expanded_inputs(info, node["inputs"])}
        for name in node["inputs"]:
            if name not in declared:
                problems.append(f"{where}: input {name!r} is not declared")
        for name, (spec, required) in declared.items():
            if name not in node["inputs"]:
                if required:
                    problems.append(f"{where}: required input {name!r} is missing")
                continue
            value = node["inputs"][name]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                problems += [f"{where}: {p}" for p in link_problems(prompt, object_info, name, spec, value)]
            elif not is_widget(spec):
                problems.append(f"{where}: {name} ({input_kind(spec)}) needs a link, got {value!r}")
            else:
                problem = value_problem(name, spec, value)
                if problem:
                    problems.append(f"{where}: {problem}")
    return problems


def link_problems(prompt, object_info, name, spec, link) -> list[str]:
    source_id, slot = link
    source = prompt.get(source_id)
    if source is None:
        return [f"{name}: linked to node {source_id}, which is not in the prompt"]
    outputs = object_info.get(source["class_type"], {}).get("output", [])
    if not 0 <= slot < len(outputs):
        return [f"{name}: linked to output {slot} of {source['class_type']}, which has {len(outputs)}"]
    output_type = outputs[slot]
    output_type = "COMBO" if isinstance(output_type, list) else output_type
    if not types_compatible(output_type, input_kind(spec)):
        return [f"{name}: {input_kind(spec)} input fed by {source['class_type']} output {slot} ({output_type})"]
    return []


def ui_link_problems(workflow: dict, object_info: dict) -> list[str]:
    """The UI file's own bookkeeping: link table, node slots and declared types agree."""
    graph = Graph(workflow)
    problems = []
    max_node = max(graph.nodes, default=0)
    max_link = max(graph.links, default=0)
    if workflow.get("last_node_id", 0) < max_node:
        problems.append(f"last_node_id {workflow.get('last_node_id')} < largest node id {max_node}")
    if workflow.get("last_link_id", 0) < max_link:
        problems.append(f"last_link_id {workflow.get('last_link_id')} < largest link id {max_link}")
    for link_id, (origin_id, origin_slot, target_id, target_slot, link_type) in graph.links.items():
        origin, target = graph.nodes.get(origin_id), graph.nodes.get(target_id)
        if origin is None or target is None:
            problems.append(f"link {link_id} joins missing nodes {origin_id} -> {target_id}")
            continue
        out_slot = origin["outputs"][origin_slot]
        in_slot = target["inputs"][target_slot]
        if link_id not in (out_slot.get("links") or []):
            problems.append(f"link {link_id} missing from node {origin_id} output {origin_slot}")
        if in_slot.get("link") != link_id:
            problems.append(f"link {link_id} missing from node {target_id} input {in_slot['name']!r}")
        if out_slot["type"] != link_type:
            problems.append(f"link {link_id} is typed {link_type} but leaves a {out_slot['type']} output")
        origin_info = object_info.get(origin["type"])
        if origin_info is not None and origin["type"] not in VIRTUAL_NODES:
            declared = origin_info["output"][origin_slot]
            if declared != out_slot["type"]:
                problems.append(f"node {origin_id} ({origin['type']}) output {origin_slot} is "
                                f"{declared} on the server, {out_slot['type']} in the file")
        target_info = object_info.get(target["type"])
        if target_info is not None and target["type"] not in VIRTUAL_NODES:
            specs = {name: spec for name, spec, _ in declared_inputs(target_info)}
            spec = specs.get(in_slot["name"])
            if spec is None:
                problems.append(f"node {target_id} ({target['type']}) has no input {in_slot['name']!r}")
            elif not types_compatible(link_type, input_kind(spec)):
                problems.append(f"link {link_id}: {link_type} into {target['type']}.{in_slot['name']} "
                                f"({input_kind(spec)})")
    return problems
