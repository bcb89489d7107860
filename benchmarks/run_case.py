"""Child-process entry of `measure.run_case_isolated`: one case, its record printed as one JSON line."""
import json
import sys


def main(argv=None) -> None:
    from .measure import RESULT_PREFIX, CaseSpec, run_case

    spec = CaseSpec(**json.loads((argv or sys.argv[1:])[0]))
    print(RESULT_PREFIX + json.dumps(run_case(spec)), flush=True)


if __name__ == "__main__":
    main()
