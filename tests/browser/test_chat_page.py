"""The browser chat page (imfast/gateway/static/index.html) in headless Chromium."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from playwright.sync_api import expect

from tests.helpers.node import NodeThread

CONV = "p:alice:bob"


class ChatPage:
    """One person's tab on the chat page, with the few actions the tests need."""

    def __init__(self, context: Any, node: NodeThread) -> None:
        self.context = context
        self.base = f"http://127.0.0.1:{node.port}/"
        self.errors: list[str] = []
        self.page = self.open()

    def open(self) -> Any:
        """A new tab on the page (the profile, and so localStorage, is kept)."""
        page = self.context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.goto(self.base)
        self.page = page
        return page

    def login_with_token(self, token: str) -> None:
        self.page.fill("#login-token", token)
        self.page.click("#login-btn")
        self.wait_online()

    def login_as_dev_user(self, user: str) -> None:
        self.page.fill("#login-user", user)
        self.page.click("#login-btn")
        self.wait_online()

    def wait_online(self) -> None:
        expect(self.page.locator("#status")).to_have_class("online")

    def start(self, target: str) -> None:
        self.page.fill("#new-chat", target)
        self.page.press("#new-chat", "Enter")

    def say(self, text: str) -> None:
        self.page.fill("#composer-input", text)
        self.page.press("#composer-input", "Enter")

    def bubble(self, body: str) -> Any:
        return self.page.locator("#messages .msg", has=self.page.locator(".body", has_text=body))

    def bubbles(self) -> list[tuple[str, str, bool]]:
        """(seq, body, mine) of every message shown, top to bottom."""
        return [tuple(x) for x in self.page.eval_on_selector_all(  # type: ignore[misc]
            "#messages .msg", "els => els.map(e => [e.dataset.seq || '', "
            "e.querySelector('.body').textContent, e.classList.contains('mine')])")]

    def conv_item(self, conv: str) -> Any:
        return self.page.locator(f"#conv-list li[data-conv='{conv}']")


def two_people(open_browser: Callable[[str], Any], node: NodeThread) -> tuple[ChatPage, ChatPage]:
    """alice logs in with a token, bob as a dev user (?user=bob)."""
    alice = ChatPage(open_browser("alice"), node)
    alice.login_with_token(node.token("alice"))
    bob = ChatPage(open_browser("bob"), node)
    bob.login_as_dev_user("bob")
    return alice, bob


def keep_screenshot(page: Any, path: Path) -> None:
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    target = os.environ.get("IMFAST_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def test_two_people_chat_with_delivered_read_and_typing(
        open_browser: Callable[[str], Any], chat_node: NodeThread, tmp_path: Path) -> None:
    alice, bob = two_people(open_browser, chat_node)
    alice.start("bob")
    expect(alice.page.locator("#chat-title")).to_have_text("bob")
    alice.say("Hi Bob! Are you there?")
    mine = alice.bubble("Hi Bob! Are you there?")
    expect(mine.locator(".state")).to_have_attribute("data-state", "delivered")

    # bob sees a new conversation with one unread message, opens it and reads it.
    expect(bob.conv_item(CONV).locator(".badge")).to_have_text("1")
    expect(bob.conv_item(CONV).locator(".preview")).to_contain_text("Hi Bob!")
    bob.conv_item(CONV).click()
    expect(bob.bubble("Hi Bob! Are you there?")).to_have_count(1)
    expect(mine.locator(".state")).to_have_attribute("data-state", "read")
    expect(bob.conv_item(CONV).locator(".badge")).to_have_count(0)

    bob.page.type("#composer-input", "Yes, hello")
    expect(alice.page.locator("#typing")).to_have_text("bob is typing…")
    bob.page.type("#composer-input", " Alice!")
    bob.page.press("#composer-input", "Enter")
    expect(alice.bubble("Yes, hello Alice!")).to_have_count(1)
    expect(alice.page.locator("#typing")).to_have_text("")
    alice.say("Lunch at noon?")
    expect(bob.bubble("Lunch at noon?")).to_have_count(1)
    bob.page.type("#composer-input", "Sure")  # leaves alice a typing indicator to look at

    assert alice.bubbles() == [("1", "Hi Bob! Are you there?", True),
                               ("2", "Yes, hello Alice!", False),
                               ("3", "Lunch at noon?", True)]
    assert [(seq, body) for seq, body, _ in bob.bubbles()] == \
        [("1", "Hi Bob! Are you there?"), ("2", "Yes, hello Alice!"), ("3", "Lunch at noon?")]
    expect(alice.page.locator("#typing")).to_have_text("bob is typing…")
    # Both have the chat open, so everything is read; the last own message says so.
    expect(alice.bubble("Lunch at noon?").locator(".state")).to_have_text("✓✓ Read")
    expect(bob.bubble("Yes, hello Alice!").locator(".state")).to_have_text("✓✓ Read")
    keep_screenshot(alice.page, tmp_path / "chat-alice.png")
    keep_screenshot(bob.page, tmp_path / "chat-bob.png")
    assert alice.errors == [] and bob.errors == []


def test_a_reloaded_page_shows_the_history_once(
        open_browser: Callable[[str], Any], chat_node: NodeThread) -> None:
    alice, bob = two_people(open_browser, chat_node)
    alice.start("bob")
    for text in ("one", "two", "three"):
        alice.say(text)
    expect(bob.conv_item(CONV)).to_have_count(1)
    bob.conv_item(CONV).click()
    expect(bob.page.locator("#messages .msg")).to_have_count(3)
    bob.say("four")
    expect(alice.bubble("four")).to_have_count(1)

    for person in (alice, bob):
        person.page.reload()
        person.wait_online()  # logged in again by itself, same conversation open
        expect(person.page.locator("#chat-title")).to_have_text(
            "bob" if person is alice else "alice")
        expect(person.page.locator("#messages .msg")).to_have_count(4)
    bob.say("five")
    expect(alice.bubble("five")).to_have_count(1)
    assert [(seq, body) for seq, body, _ in alice.bubbles()] == \
        [("1", "one"), ("2", "two"), ("3", "three"), ("4", "four"), ("5", "five")]
    assert alice.errors == [] and bob.errors == []


def test_a_closed_page_receives_what_was_sent_meanwhile(
        open_browser: Callable[[str], Any], chat_node: NodeThread) -> None:
    alice, bob = two_people(open_browser, chat_node)
    alice.start("bob")
    alice.say("before you left")
    bob.conv_item(CONV).click()
    expect(bob.bubble("before you left")).to_have_count(1)

    bob.page.close()  # bob goes offline
    alice.say("while you were away 1")
    alice.say("while you were away 2")
    for text in ("while you were away 1", "while you were away 2"):
        expect(alice.bubble(text).locator(".state")).to_have_attribute("data-state",
                                                                       "delivered")

    bob.open()  # bob comes back: logged in by itself, same conversation
    bob.wait_online()
    expect(bob.page.locator("#messages .msg")).to_have_count(3)
    assert [body for _, body, _ in bob.bubbles()] == \
        ["before you left", "while you were away 1", "while you were away 2"]
    expect(alice.page.locator(".msg.mine .state[data-state='read']")).to_have_count(3)
    assert alice.errors == [] and bob.errors == []


def test_the_page_reconnects_and_sends_what_was_written_while_offline(
        open_browser: Callable[[str], Any], chat_node: NodeThread) -> None:
    alice, bob = two_people(open_browser, chat_node)
    alice.start("bob")
    alice.say("first")
    bob.conv_item(CONV).click()
    expect(bob.bubble("first")).to_have_count(1)

    port = chat_node.port
    chat_node.stop()
    expect(alice.page.locator("#status")).to_have_class("reconnecting")
    alice.say("written while the server was down")
    pending = alice.page.locator("#messages .msg.pending")
    expect(pending.locator(".state")).to_have_attribute("data-state", "sending")
    chat_node.settings = chat_node.settings.replace(http_port=port)
    chat_node.start()

    alice.wait_online()
    bob.wait_online()
    expect(bob.bubble("written while the server was down")).to_have_count(1)
    expect(pending).to_have_count(0)
    assert [(seq, body) for seq, body, _ in bob.bubbles()] == \
        [("1", "first"), ("2", "written while the server was down")]
    assert [(seq, body) for seq, body, _ in alice.bubbles()] == \
        [("1", "first"), ("2", "written while the server was down")]


def test_a_refused_login_says_why(open_browser: Callable[[str], Any],
                                  chat_node: NodeThread) -> None:
    page = ChatPage(open_browser("mallory"), chat_node)
    page.page.fill("#login-token", "not-a-token")
    page.page.click("#login-btn")
    expect(page.page.locator("#login-error")).to_contain_text("4500")
    expect(page.page.locator("#login-error")).to_contain_text("invalid token")
    expect(page.page.locator("#app")).to_be_hidden()
