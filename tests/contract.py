"""Where the contract checks live: ../shared/tools beside the checkout, or the copies in tests/contract_tools."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TOOLS = os.path.join(os.path.dirname(ROOT), 'shared', 'tools')
TOOLS = SHARED_TOOLS if os.path.isdir(SHARED_TOOLS) else os.path.join(ROOT, 'tests', 'contract_tools')
