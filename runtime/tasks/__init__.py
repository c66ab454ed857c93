"""The generation tasks, one module each, and their registry (record.py).

A new task is a module here with a ``TASK`` record and one line below; the Python API, the CLI and the HTTP
server find it in ``TASKS``.
"""

from sdtrt.runtime.tasks import img2img, inpaint, outpaint, txt2img, upscale
from sdtrt.runtime.tasks.checks import model_limits
from sdtrt.runtime.tasks.record import TASKS, Argument, Task, get_task, image_input, option, register, unregister

for _module in (txt2img, img2img, inpaint, outpaint, upscale):  # the registry, in the order the faces list them
    register(_module.TASK)

__all__ = [
    "TASKS",
    "Argument",
    "Task",
    "get_task",
    "image_input",
    "model_limits",
    "option",
    "register",
    "unregister",
]
