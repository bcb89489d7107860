"""`option_keywords`: a loss function's options are the fields of its config dataclasses, spelled once.

A loss function is written on its configs (``config: LossConfig``, ``head: HeadConfig``). The
decorator gives it the signature users call, in which every field of each config is a keyword-only
argument with the field's default; a call builds the configs from those keywords (their checks run
there, errors name the keyword) and passes them on. So a new option is one dataclass field (for
`LossConfig`, one registry entry) and reaches the function, its ``nn.Module`` and the trainer
configs with nothing else to edit. `inspect.signature`, ``help()`` and the modules read the
generated signature.

A ready config may also be passed under the placeholder's name (``head=HeadConfig(...)``): keywords
given beside it replace its fields (`dataclasses.replace`), which is how a module's options fixed at
construction merge with the ones of one call.
"""
import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Union


@dataclass(frozen=True)
class OptionGroup:
    """The keywords one config dataclass stands for.

    Attributes:
        cls: the frozen dataclass; its fields, less those named in its ``NOT_KEYWORDS`` class
            attribute (options the function sets itself), become keywords.
        renames: keyword -> field, where the function's name differs from the field's
            (``teacher_softcap`` -> ``ref_softcap``).
    """

    cls: type
    renames: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # keyword -> field, computed once: `build` reads it on every loss call
        to_keyword = {name: keyword for keyword, name in self.renames.items()}
        internal = getattr(self.cls, "NOT_KEYWORDS", frozenset())
        object.__setattr__(self, "_fields", {to_keyword.get(f.name, f.name): f for f in dataclasses.fields(self.cls)
                                             if f.init and f.name not in internal})

    def fields(self) -> Dict[str, dataclasses.Field]:
        """keyword -> the dataclass field it fills, in field order."""
        return self._fields

    def parameters(self) -> List[inspect.Parameter]:
        """The keyword-only parameters of the public signature."""
        return [inspect.Parameter(keyword, inspect.Parameter.KEYWORD_ONLY, default=_default(f), annotation=f.type)
                for keyword, f in self.fields().items()]

    def build(self, base: Optional[Any], values: Mapping[str, Any]) -> Any:
        """``cls(**values)``, or ``base`` with ``values`` replaced; ``values`` are keyword -> value.
        A check's error names the keyword the caller used."""
        if base is not None and not values:
            return base
        by_field = {self._fields[keyword].name: value for keyword, value in values.items()}
        try:
            return dataclasses.replace(base, **by_field) if base is not None else self.cls(**by_field)
        except (TypeError, ValueError) as error:
            message = str(error)
            for keyword, name in self.renames.items():
                if message.startswith(f"{name}:"):
                    raise type(error)(keyword + message[len(name):]) from None
            raise


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return inspect.Parameter.empty


def option_keywords(**groups: Union[type, OptionGroup]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: each keyword-only parameter named in ``groups`` (placeholder -> config dataclass
    or `OptionGroup`) is filled from that config's keywords.

    The decorated function's signature keeps its other parameters and puts, where each placeholder
    stands, the placeholder (now optional: a ready config, default None) followed by its config's
    keywords. The returned function carries ``option_groups`` (placeholder -> `OptionGroup`).
    """
    specs = {name: g if isinstance(g, OptionGroup) else OptionGroup(g) for name, g in groups.items()}

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = inspect.signature(fn)
        owner: Dict[str, str] = {}    # keyword -> placeholder
        parameters: List[inspect.Parameter] = []
        for p in own.parameters.values():
            if p.name not in specs:
                parameters.append(p)
                continue
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                raise TypeError(f"{fn.__name__}: placeholder {p.name!r} must be keyword-only")
            spec = specs[p.name]
            parameters.append(p.replace(default=None, annotation=Optional[spec.cls]))
            for q in spec.parameters():
                if q.name in own.parameters or q.name in owner:
                    raise TypeError(f"{fn.__name__}: option {q.name!r} of {spec.cls.__name__} is already a parameter")
                owner[q.name] = p.name
                parameters.append(q)
        missing = set(specs) - set(own.parameters)
        if missing:
            raise TypeError(f"{fn.__name__}: expected keyword-only parameters {sorted(missing)}")

        @functools.wraps(fn)
        def with_options(*args: Any, **kwargs: Any) -> Any:
            given: Dict[str, Dict[str, Any]] = {name: {} for name in specs}
            for keyword in [k for k in kwargs if k in owner]:
                given[owner[keyword]][keyword] = kwargs.pop(keyword)
            for name, spec in specs.items():
                base = kwargs.pop(name, None)
                if base is not None and not isinstance(base, spec.cls):
                    raise TypeError(f"{name}: expected a {spec.cls.__name__} or None, got {type(base).__name__}")
                kwargs[name] = spec.build(base, given[name])
            return fn(*args, **kwargs)

        with_options.__signature__ = own.replace(parameters=parameters)
        with_options.option_groups = specs
        return with_options

    return decorate
