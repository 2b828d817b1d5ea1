"""FitCLIP trainer (teacher-student distillation on WebVid shards). Built in issue 3; nothing here yet."""
