"""Custom socket types shared by the pack's nodes."""
from comfy_api.latest import io

# A kernels.schedule.TokenRatioSchedule travels on this socket.
TokenRatioScheduleType = io.Custom("TOKEN_RATIO_SCHEDULE")
