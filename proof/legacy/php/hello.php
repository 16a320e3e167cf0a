<?php
// Another route of the same server, to see whether streams starve it.
echo "hello\n";
