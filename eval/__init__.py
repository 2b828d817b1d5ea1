"""Zero-shot evaluation suite. Built in issue 4; nothing here yet."""
