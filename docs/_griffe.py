"""A griffe extension for what inspection gets wrong about equinox modules and module
constants.

- The `__init__` that equinox generates from a module's fields has Python's
  placeholder docstring ("Initialize self. ..."), and annotates a field that has a
  converter as `Any`. Drop the one, and show the field's declared type for the other.
- A module constant has no docstring at run time, so inspection gives it its type's
  (`int`'s, `dict`'s). Take the one written below it in the source instead.
- Inspection expands type aliases (jaxtyping's `PRNGKeyArray`, `DTypeLike`, our
  `LossFn`) into what they stand for. Show the annotations as the source writes them,
  except for the private aliases of `revdeq._custom_types` (`Fn`, `Y`, `Args`),
  which are written out in the public types they stand for.
"""

import functools
import inspect
import re

import griffe


@functools.cache
def _static(module: str) -> griffe.Module:
    return griffe.load(module, allow_inspection=False)


@functools.cache
def _private_aliases() -> dict[str, str]:
    """`name -> definition` for each alias of `revdeq._custom_types`."""
    members = _static("revdeq._custom_types").members.values()
    written = [m for m in members if not m.is_alias and m.is_attribute]
    return {a.name: str(a.value) for a in written if a.value is not None}


def _public(annotation: object) -> object:
    """`annotation` with the private aliases written out, as text, or unchanged."""
    text, aliases = str(annotation), _private_aliases()
    pattern = re.compile(r"\b(" + "|".join(aliases) + r")\b")
    if not pattern.search(text):
        return annotation
    while pattern.search(text):
        text = pattern.sub(lambda m: aliases[m.group(1)], text)
    return text


class EquinoxInit(griffe.Extension):
    def on_class_members(self, *, cls: griffe.Class, **kwargs) -> None:
        del kwargs
        init = cls.members.get("__init__")
        if not isinstance(init, griffe.Function):
            return
        docstring = init.docstring
        if docstring is not None and docstring.value.startswith("Initialize self."):
            init.docstring = None
        fields = getattr(griffe.dynamic_import(cls.path), "__dataclass_fields__", {})
        for parameter in init.parameters:
            if str(parameter.annotation) == "typing.Any" and parameter.name in fields:
                declared = fields[parameter.name].type
                parameter.annotation = inspect.formatannotation(declared)


class ModuleConstants(griffe.Extension):
    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs) -> None:
        del kwargs
        if isinstance(attr.parent, griffe.Module):
            written = _static(attr.parent.path).members.get(attr.name)
            if written is not None and written.is_attribute:
                attr.docstring = written.docstring


class WrittenAnnotations(griffe.Extension):
    def on_function_instance(self, *, node, func: griffe.Function, **kwargs) -> None:
        del kwargs
        obj = inspect.unwrap(node.obj)
        module, qualname = getattr(obj, "__module__", None), obj.__qualname__
        if module is None or not module.startswith("revdeq") or "<" in qualname:
            return
        written = _static(module)
        for name in qualname.split("."):
            written = written.members.get(name) if written is not None else None
        if not isinstance(written, griffe.Function):
            return
        for parameter in func.parameters:
            if parameter.name in written.parameters:
                annotation = written.parameters[parameter.name].annotation
                parameter.annotation = _public(annotation)
        func.returns = _public(written.returns)
