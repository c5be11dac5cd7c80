"""tools/spy_summary.py: a py-spy raw profile read per process and thread."""

import importlib.util
from pathlib import Path

TOOL = Path(__file__).resolve().parent.parent / "tools" / "spy_summary.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("spy_summary", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shares_are_per_thread_and_name_the_innermost_frames():
    tool = load_tool()
    gpu = 'process 1:"python3 bench.py";process 11:"/usr/bin/python3 -m ray.worker --flag"'  # child of 1
    lines = [
        f"{gpu};thread (12): launcher;Thread.run (/x/threading.py:982);_launch_loop (/d/pipeline.py:270) 30",
        f"{gpu};thread (12): launcher;Thread.run (/x/threading.py:982);_launch_loop (/d/pipeline.py:276);"
        "_extract (/d/pipeline.py:350) 10",
        f"{gpu};thread (13): results;_result_loop (/d/worker.py:400) 60",
        "not a profile line",
    ]
    summary = tool.summarise(lines, depth=2)
    launcher = summary[("11 python3 -m ray.worker --flag", "launcher")]
    assert launcher == {"_launch_loop (pipeline.py:270) <- Thread.run (threading.py:982)": 30,
                        "_extract (pipeline.py:350) <- _launch_loop (pipeline.py:276)": 10}
    text = tool.format_summary(summary, top=1, min_share=0.0)
    assert "launcher: 40 samples\n     75.0%  _launch_loop (pipeline.py:270)" in text
    assert text.index("results: 60") < text.index("launcher: 40")  # busiest thread first
    assert "launcher" not in tool.format_summary(summary, min_share=0.5)
