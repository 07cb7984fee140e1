"""A marker picks another image (a name from sandbox_images), a network, extra environment."""

from __future__ import annotations

import pytest

from pytest_sandbox import Sandbox


@pytest.mark.sandbox(image="service", env={"GREETING": "hi"})
def test_service_image(sandbox: Sandbox) -> None:
    assert sandbox.exec("cat index.html").stdout == "hello from the service image\n"
    assert sandbox.exec("echo $GREETING").stdout == "hi\n"
    assert not sandbox.fs.exists("/work/project")


@pytest.mark.sandbox(image="service")
class TestWholeClass:
    def test_one(self, sandbox: Sandbox) -> None:
        assert sandbox.exec("pwd").stdout == "/srv/www\n"
